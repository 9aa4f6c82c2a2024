"""Build 7B-shaped benchmark checkpoints: the real Llama-7B matrix shapes, bf16 on disk.

Per layer, 7 modules: q/k/v/o_proj 4096×4096, gate/up_proj 11008×4096, down_proj 4096×11008
(32 layers = 224 modules). Written the way HF and PEFT write them:

- ``base/`` and ``full/``: one ``model-0000i-of-0000N.safetensors`` shard per layer plus
  ``model.safetensors.index.json`` and a Llama ``config.json``; the fine-tune is
  bf16(W + ΔW) with ΔW a dense update (a few strong directions over a broad bulk, like a real
  full fine-tune), so the stored update is what a bf16 fine-tune really yields.
- ``lora/``: a PEFT LoRA r=16 adapter (``adapter_config.json`` + ``adapter_model.safetensors``,
  keys ``base_model.model.model.layers.i.<module>.lora_{A,B}.weight``).

Deterministic (seeded); ``--device cuda`` draws the random matrices on the GPU (much faster).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER = 4096, 11008
MODULES = {  # name -> (out, in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER),
}
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
          "intermediate_size": INTER, "num_attention_heads": 32, "num_key_value_heads": 32,
          "torch_dtype": "bfloat16", "tie_word_embeddings": False, "vocab_size": 32000}


def shrink(hidden: int = 64, inter: int = 96) -> None:
    """Use small stand-in shapes (dry runs of the benchmark scripts; same names, same layout)."""
    global HIDDEN, INTER
    HIDDEN, INTER = hidden, inter
    for mod, (m, n) in MODULES.items():
        MODULES[mod] = (inter if m == 11008 else hidden, inter if n == 11008 else hidden)


def _gen(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _update(m: int, n: int, gen: torch.Generator, device: str) -> torch.Tensor:
    """A full-fine-tune-like ΔW (float32): 8 strong directions over a Gaussian bulk."""
    spikes = torch.randn(m, 8, generator=gen, device=device) @ torch.randn(8, n, generator=gen,
                                                                           device=device)
    bulk = torch.randn(m, n, generator=gen, device=device)
    return 2e-4 * spikes / 8**0.5 + 2e-3 * bulk


def build_full(root: Path, layers: int, device: str = "cpu", seed: int = 0) -> tuple[Path, Path]:
    """``root/base`` and ``root/full`` (bf16 shards, one per layer); skipped if already there."""
    base, full = root / "base", root / "full"
    marker = root / f"full-{layers}.done"
    if marker.is_file():
        return base, full
    for folder in (base, full):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(CONFIG | {"num_hidden_layers": layers}))
    gen = _gen(seed, device)
    index: dict[str, str] = {}
    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        wb, wf = {}, {}
        for mod, (m, n) in MODULES.items():
            key = f"model.layers.{i}.{mod}.weight"
            w = 0.02 * torch.randn(m, n, generator=gen, device=device)
            wb[key] = w.to(torch.bfloat16).cpu().contiguous()
            wf[key] = (w + _update(m, n, gen, device)).to(torch.bfloat16).cpu().contiguous()
            index[key] = shard
        save_file(wb, str(base / shard), metadata={"format": "pt"})
        save_file(wf, str(full / shard), metadata={"format": "pt"})
    for folder in (base, full):
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index}))
    marker.write_text("ok")
    return base, full


def build_lora(root: Path, layers: int, r: int = 16, device: str = "cpu", seed: int = 1) -> Path:
    """``root/lora-<layers>``: a PEFT LoRA adapter of rank r on all 7 linear kinds (bf16)."""
    folder = root / f"lora-{layers}"
    if (folder / "adapter_model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    gen = _gen(seed, device)
    tensors = {}
    for i in range(layers):
        for mod, (m, n) in MODULES.items():
            prefix = f"base_model.model.model.layers.{i}.{mod}"
            a = torch.randn(r, n, generator=gen, device=device) / n**0.5
            b = 1e-2 * torch.randn(m, r, generator=gen, device=device)
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).cpu().contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).cpu().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
              "fan_in_fan_out": False, "init_lora_weights": True,
              "target_modules": sorted({k.split(".")[-1] for k in MODULES}),
              "base_model_name_or_path": "llama-7b-shaped", "rank_pattern": {}, "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return folder


def main() -> None:
    """Build the checkpoints from the command line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--lora-layers", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(build_full(args.root, args.layers, args.device), build_lora(args.root, args.lora_layers,
                                                                      device=args.device))


if __name__ == "__main__":
    main()
