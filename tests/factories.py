"""Genuine checkpoints for tests, made with transformers + peft from tiny random configs.

Every builder is deterministic (seeded) and writes real files the way users' tools write them.
``expected_deltas`` is the oracle: PEFT's own ``merge_and_unload()`` minus the base weights,
canonicalised to (out, in).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

CONV1D_KINDS = ("c_attn", "c_proj", "c_fc")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def save_model(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    return folder


def full_finetune(model, folder: Path, seed: int = 1, rank: int | None = None, **kw) -> Path:
    """A 'fine-tuned' copy: every 2-D weight gets a random update (low-rank if ``rank``)."""
    g = torch.Generator().manual_seed(seed)
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim != 2 or "wpe" in name:
                continue
            m, n = p.shape
            if rank is None:
                p.add_(0.02 * torch.randn(m, n, generator=g))
            else:
                p.add_(0.05 * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g))
    ft.save_pretrained(folder, **kw)
    return folder


def lora_adapter(model, folder: Path, seed: int = 2, **lora_kw):
    """A PEFT adapter with non-zero B (init_lora_weights=False gives random A and B).

    Returns (adapter folder, the PeftModel) so that tests can merge it as the oracle.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kw.setdefault("init_lora_weights", False)
    cfg = LoraConfig(**lora_kw)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(folder)
    return folder, pm


def expected_deltas(base_model, peft_model) -> dict[str, torch.Tensor]:
    """PEFT's merge minus the base, per module, canonical (out, in), float64; zero ones dropped."""
    base_sd = {k: v.detach().to(torch.float64) for k, v in base_model.state_dict().items()}
    merged = copy.deepcopy(peft_model).merge_and_unload()
    out = {}
    for key, w in merged.state_dict().items():
        if key not in base_sd or w.ndim < 2:
            continue
        d = w.detach().to(torch.float64) - base_sd[key]
        if not bool(d.any()):
            continue
        name = key.removesuffix(".weight")
        if name.rsplit(".", 1)[-1] in CONV1D_KINDS and "gpt2" in type(base_model).__name__.lower():
            d = d.T
        out[name] = d.reshape(d.shape[0], -1)
    return out


# ---------------------------------------------------------------------------------------------
# Builders for the loader tests (adapter variants, pickled checkpoints, MultiLoRA folders).


def tiny_llama_biased(seed: int = 0):
    """A tiny Llama whose attention and MLP projections have biases (for ``lora_bias``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


def peft_adapter(model, folder: Path, seed: int = 2, *, adapter_name: str = "default",
                 save_kw: dict | None = None, perturb: bool = True, **lora_kw):
    """Like :func:`lora_adapter`, with a named adapter, save options and 'trained' extras.

    ``perturb`` adds noise to every trainable tensor that is not a LoRA factor (modules_to_save
    copies, trainable token rows, DoRA magnitudes), as training would, so their updates are not
    zero. Returns (folder, PeftModel).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kw.setdefault("init_lora_weights", False)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**lora_kw), adapter_name=adapter_name)
    if perturb:
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if p.requires_grad and ".lora_A" not in name and ".lora_B" not in name \
                        and "lora_embedding" not in name:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder, **(save_kw or {}))
    return folder, pm


def expected_bias_deltas(base_model, peft_model) -> dict[str, torch.Tensor]:
    """PEFT's merge minus the base for every bias that changed, float64."""
    base_sd = {k: v.detach().to(torch.float64) for k, v in base_model.state_dict().items()}
    merged = copy.deepcopy(peft_model).merge_and_unload()
    out = {}
    for key, b in merged.state_dict().items():
        if key.endswith(".bias") and key in base_sd:
            d = b.detach().to(torch.float64) - base_sd[key]
            if bool(d.any()):
                out[key.removesuffix(".bias")] = d
    return out


def save_bin(model, folder: Path, shards: int = 1) -> Path:
    """An HF folder in the pickled format: ``pytorch_model.bin`` (or N shards + index) + config."""
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(str(folder / "config.json"))
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    import json

    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: sd[k] for k in keys[i::shards]}
        torch.save(part, folder / name)
        weight_map |= {k: name for k in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


class TinyConv(torch.nn.Module):
    """Two Conv2d layers (3×3 and 1×1) and a Linear, for conv LoRA."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.point = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 4)


def tiny_conv(seed: int = 0) -> TinyConv:
    torch.manual_seed(seed)
    return TinyConv().eval()


def save_state_dict(model, folder: Path) -> Path:
    """A bare ``model.safetensors`` of a plain torch module (no config.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"))
    return folder


def multilora_folder(folder: Path, modules: dict[str, tuple[int, int]], *, n: int = 3, r: int = 2,
                     alpha: float = 4.0, scaling: str = "n", prefix: str = "", leaf: str = "",
                     seed: int = 5, config_name: str = "multilora_config.json",
                     weights_name: str = "multilora_model.safetensors") -> dict[str, dict]:
    """Write a MultiLoRA checkpoint by hand (DESIGN.md format); return its float64 tensors.

    ``modules`` maps module path → (out, in). ``scaling`` is "n" (n,) or "out" (n, out);
    ``prefix``/``leaf`` give the MTL-LoRA-style names (``base_model.model.`` and ``.weight``).
    """
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, out = {}, {}
    for mod, (d_out, d_in) in modules.items():
        a = torch.randn(n, r, d_in, generator=g)
        b = torch.randn(n, d_out, r, generator=g)
        s = torch.randn((n,) if scaling == "n" else (n, d_out), generator=g)
        out[mod] = {"A": a.double(), "B": b.double(), "scaling": s.double()}
        for part, t in (("A", a), ("B", b), ("scaling", s)):
            tensors[f"{prefix}{mod}.lora_{part}{leaf}"] = t.contiguous()
    save_file(tensors, str(folder / weights_name))
    config = {"format": "multilora", "n": n, "r": r, "lora_alpha": alpha, "scaling_shape": scaling}
    (folder / config_name).write_text(json.dumps(config))
    return out


def multilora_adapter(model, folder: Path, n: int = 3, r: int = 2, lora_alpha: float = 4.0,
                      seed: int = 3, target_modules=("q_proj", "k_proj", "v_proj", "o_proj",
                                                     "gate_proj", "up_proj", "down_proj")) -> Path:
    """A MultiLoRA checkpoint in DESIGN.md's format, for every ``nn.Linear`` of a target kind.

    ``multilora_model.safetensors`` holds ``<module>.lora_A`` (n, r, in), ``.lora_B`` (n, out, r)
    and ``.lora_scaling`` (n,) (random, non-zero); ``multilora_config.json`` says n, r, α.
    ΔW = Σᵢ sᵢ·Bᵢ·Aᵢ·(α/r).
    """
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in target_modules:
            continue
        d_out, d_in = mod.weight.shape
        tensors[f"{name}.lora_A"] = torch.randn(n, r, d_in, generator=g) / d_in**0.5
        tensors[f"{name}.lora_B"] = 0.05 * torch.randn(n, d_out, r, generator=g)
        tensors[f"{name}.lora_scaling"] = 0.5 + torch.rand(n, generator=g)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "multilora_model.safetensors"))
    config = {"format": "multilora", "version": 1, "n": n, "r": r, "lora_alpha": lora_alpha,
              "scaling_shape": "n", "target_modules": sorted(set(target_modules))}
    (folder / "multilora_config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------
# Builders for the other PEFT types (AdaLoRA, VeRA, LoHa, LoKr, IA3, OFT, BOFT, FourierFT).


def peft_typed_adapter(model, folder: Path, config, seed: int = 3, noise: float = 0.1):
    """A PEFT adapter of any type whose every trainable tensor is moved off its initialisation
    (as training would: most types start at ΔW = 0). Returns (folder, PeftModel)."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), config)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(noise * torch.randn(p.shape, generator=g))
    pm.save_pretrained(folder)
    return folder, pm


def expected_deltas64(base_model, peft_model) -> dict[str, torch.Tensor]:
    """:func:`expected_deltas` with PEFT's merge run in float64 (no float32 cancellation in
    W + ΔW − W, so the oracle is exact where ΔW is small against W)."""
    return expected_deltas(copy.deepcopy(base_model).double(), copy.deepcopy(peft_model).double())


def noisy_finetune(model, folder: Path, seed: int = 7, noise: float = 0.01, rank: int = 2,
                   signal: float = 0.2, only: str = "layers") -> tuple[Path, object]:
    """A 'fine-tuned' copy whose 2-D weights under ``only`` get a rank-``rank`` update plus a
    dense noise floor (the regime the gd/mp rank policies separate). Returns (folder, model)."""
    g = torch.Generator().manual_seed(seed)
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and only in name:
                m, n = p.shape
                p.add_(noise * torch.randn(m, n, generator=g)
                       + signal * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / n)
    ft.save_pretrained(folder)
    return folder, ft


def trainer_lora_run(folder: Path, *, steps: int = 24, save_steps: int = 8, callbacks=(),
                     seed: int = 0, seq: int = 12, batch: int = 2, targets=("q_proj", "v_proj",
                                                                             "down_proj")):
    """A genuine transformers ``Trainer`` + PEFT LoRA run of the tiny Llama on random tokens:
    ``checkpoint-N`` folders every ``save_steps`` under ``folder``, on one thread. Returns the
    Trainer."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    pm = get_peft_model(tiny_llama(seed), LoraConfig(r=4, lora_alpha=8,
                                                     target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    data = [{"input_ids": ids, "labels": ids}
            for ids in torch.randint(0, 64, (steps * batch, seq), generator=g)]
    args = TrainingArguments(output_dir=str(folder), max_steps=steps, save_steps=save_steps,
                             per_device_train_batch_size=batch, learning_rate=1e-2, report_to=[],
                             logging_steps=save_steps, use_cpu=True, disable_tqdm=True,
                             save_only_model=True, seed=seed, dataloader_num_workers=0)
    trainer = Trainer(model=pm, args=args, train_dataset=data, callbacks=list(callbacks))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits at barriers (2 shared cores)
    try:
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer
