"""Build three genuinely trained updates of one tiny base, for the democracy report's example figures.

    python analyses/make_example_checkpoints.py OUT_DIR [--steps 600]

writes ``OUT_DIR/base`` (a tiny Llama, pretrained briefly on a copy task), and three fine-tunes of
it on a mixture of sequence tasks (reverse, a fixed token permutation, shift-by-one):

- ``OUT_DIR/lora``: a PEFT LoRA adapter, r = 8 on every linear layer of the blocks;
- ``OUT_DIR/multilora``: MultiLoRA (Wang et al. 2023), n = 4 parallel rank-2 modules (same
  parameter count as the LoRA), A and B Kaiming-uniform (a = √5), scaling factors zero-initialised
  and learnable; written in deltaspec's MultiLoRA format (stacked ``lora_A`` (n, r, in),
  ``lora_B`` (n, out, r), ``lora_scaling`` (n,) + ``multilora_config.json``);
- ``OUT_DIR/full``: a full fine-tune (HF folder).

Needs transformers and peft (the dev extras). Takes about a minute on 2 CPU cores. The bundled
training reference (``deltaspec demo``) will replace this stand-in with a real multi-task run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from pathlib import Path

import torch
from torch import nn

VOCAB, SEQ, BATCH = 64, 10, 32
TASKS = {"copy": 1, "reverse": 2, "perm": 3, "shift": 4}  # task token ids; data tokens are ≥ 8
PERM = 8 + torch.randperm(VOCAB - 8, generator=torch.Generator().manual_seed(7))  # token → π(token)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0) -> nn.Module:
    """A 4-layer Llama of hidden size 64 (random init)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def batch(tasks: list[str], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[task, x₁…x₁₀, SEP, y₁…y₁₀] with y = task(x); the loss is on y only."""
    x = torch.randint(8, VOCAB, (BATCH, SEQ), generator=gen)
    which = torch.randint(0, len(tasks), (BATCH,), generator=gen)
    ys = []
    for row, t in zip(x, which.tolist(), strict=True):
        name = tasks[t]
        y = {"copy": row, "reverse": row.flip(0), "perm": PERM[row - 8],
             "shift": 8 + (row - 8 + 1) % (VOCAB - 8)}[name]
        ys.append(y)
    task_ids = torch.tensor([TASKS[tasks[t]] for t in which.tolist()]).unsqueeze(1)
    sep = torch.full((BATCH, 1), 5)
    ids = torch.cat([task_ids, x, sep, torch.stack(ys)], dim=1)
    labels = ids.clone()
    labels[:, : SEQ + 2] = -100
    return ids, labels


def train(model: nn.Module, tasks: list[str], steps: int, lr: float, seed: int) -> float:
    """AdamW on the trainable parameters; returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        ids, labels = batch(tasks, gen)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


class MultiLoRALinear(nn.Module):
    """y = W₀x + Σᵢ sᵢ·Bᵢ·Aᵢ·x·(α/r): n parallel rank-r modules with learnable scalings sᵢ (zero
    at start), A and B Kaiming-uniform (a = √5)."""

    def __init__(self, base: nn.Linear, n: int, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        d_out, d_in = base.weight.shape
        self.lora_A = nn.Parameter(torch.empty(n, r, d_in))
        self.lora_B = nn.Parameter(torch.empty(n, d_out, r))
        for i in range(n):
            nn.init.kaiming_uniform_(self.lora_A.data[i], a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.lora_B.data[i], a=math.sqrt(5))
        self.lora_scaling = nn.Parameter(torch.zeros(n))
        self.scale = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("...i,nri->...nr", x, self.lora_A)
        h = torch.einsum("...nr,nor->...no", h, self.lora_B)
        return self.base(x) + self.scale * torch.einsum("...no,n->...o", h, self.lora_scaling)


def add_multilora(model: nn.Module, n: int, r: int, alpha: float) -> dict[str, MultiLoRALinear]:
    """Freeze ``model`` and wrap every target linear layer; returns name → wrapper."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            wrapped[name] = MultiLoRALinear(mod, n, r, alpha)
            setattr(parent, name.rsplit(".", 1)[-1], wrapped[name])
    return wrapped


def save_multilora(wrapped: dict[str, MultiLoRALinear], folder: Path, n: int, r: int,
                   alpha: float) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in wrapped.items():
        tensors[f"{name}.lora_A"] = m.lora_A.detach().contiguous()
        tensors[f"{name}.lora_B"] = m.lora_B.detach().contiguous()
        tensors[f"{name}.lora_scaling"] = m.lora_scaling.detach().contiguous()
    save_file(tensors, str(folder / "multilora_model.safetensors"))
    config = {"format": "multilora", "version": 1, "n": n, "r": r, "lora_alpha": alpha,
              "scaling_shape": "n", "target_modules": list(TARGETS)}
    (folder / "multilora_config.json").write_text(json.dumps(config, indent=2) + "\n")


def build(out: Path, steps: int = 600) -> dict[str, float]:
    """Write base, lora, multilora and full under ``out``; returns the final loss per method."""
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    mix = ["reverse", "perm", "shift"]
    base = tiny_llama()
    losses = {"base": train(base, ["copy"], steps, 3e-3, seed=10)}
    base.save_pretrained(out / "base")

    full = copy.deepcopy(base)
    losses["full"] = train(full, mix, steps, 1e-3, seed=11)
    full.save_pretrained(out / "full")

    torch.manual_seed(12)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=list(TARGETS)))
    losses["lora"] = train(lora, mix, steps, 3e-3, seed=11)
    lora.save_pretrained(out / "lora")

    torch.manual_seed(13)
    ml = copy.deepcopy(base)
    wrapped = add_multilora(ml, n=4, r=2, alpha=4.0)
    losses["multilora"] = train(ml, mix, steps, 3e-3, seed=11)
    save_multilora(wrapped, out / "multilora", n=4, r=2, alpha=4.0)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write base/, lora/, multilora/, full/ into")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    args = parser.parse_args()
    losses = build(args.out, args.steps)
    print("final training loss: " + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))


if __name__ == "__main__":
    main()
