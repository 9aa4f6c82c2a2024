"""Checkpoint writers (and the one reader the reference needs: its own full checkpoints).

Formats (see DESIGN.md, "Checkpoint formats"):

* full model — HF-style folder: ``config.json`` + ``model.safetensors`` (Llama-like key names,
  contiguous float32 tensors);
* LoRA — PEFT-style folder: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_A.weight`` (r × in) and ``.lora_B.weight`` (out × r);
* MultiLoRA — ``multilora_config.json`` + ``multilora_model.safetensors`` with keys
  ``<module>.lora_A`` (n, r, in), ``<module>.lora_B`` (n, out, r), ``<module>.lora_scaling``
  (n,) or (n, out).

Every file is written to a temporary name in its folder and moved into place with ``os.replace``;
the weights go first and the config last, so a folder is never recognised as a checkpoint before
it is complete, and a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .layers import LoRALinear, MultiLoRALinear
from .model import DeltaspecReferenceLM, ModelConfig

MODEL_TYPE = "deltaspec-reference"
ARCHITECTURE = "DeltaspecReferenceLM"


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Run ``write(tmp)`` on a temporary file next to ``path``, then rename it onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    _atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def write_safetensors_atomic(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write contiguous float32 CPU copies of ``tensors`` as safetensors, atomically."""
    clean = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(clean, str(tmp), metadata={"format": "pt"}))


def full_config_dict(cfg: ModelConfig, extra: Mapping[str, Any] | None = None) -> dict:
    """The ``config.json`` of a reference checkpoint: HF identifiers plus every dimension."""
    out: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "architectures": [ARCHITECTURE],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "head_dim": cfg.head_dim,
        **cfg.to_dict(),
    }
    out.update(extra or {})
    return out


def save_full_checkpoint(
    model: nn.Module,
    out_dir: str | os.PathLike,
    config: Mapping[str, Any],
) -> Path:
    """Write ``model``'s state dict (``model.safetensors``) and ``config`` (``config.json``).

    ``model`` must hold no adapter layers (merge them first); the keys are its state-dict names.
    """
    out = Path(out_dir)
    state = model.state_dict()
    bad = [k for k in state if ".base." in k or "lora_" in k]
    if bad:
        raise ValueError(f"model still holds adapter tensors (merge first): {bad[0]}")
    write_safetensors_atomic(out / "model.safetensors", state)
    write_json_atomic(out / "config.json", dict(config))
    return out


def load_full_checkpoint(folder: str | os.PathLike) -> tuple[DeltaspecReferenceLM, dict]:
    """Load a reference checkpoint written by :func:`save_full_checkpoint` (model, config.json)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{folder / 'config.json'}: not a {MODEL_TYPE} checkpoint")
    fields = ModelConfig.__dataclass_fields__
    cfg = ModelConfig(**{k: v for k, v in config.items() if k in fields})
    model = DeltaspecReferenceLM(cfg)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    model.load_state_dict(state, strict=True)
    return model, config


def save_peft_lora(
    layers: Mapping[str, LoRALinear],
    out_dir: str | os.PathLike,
    base_model_name_or_path: str,
    target_modules: list[str],
) -> Path:
    """Write a PEFT-style LoRA adapter folder for ``layers`` (module path → LoRALinear)."""
    if not layers:
        raise ValueError("no LoRA layers to save")
    ranks = {layer.r for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError("all LoRA layers must share r and alpha (no rank_pattern support)")
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        tensors[f"base_model.model.{path}.lora_A.weight"] = layer.lora_A  # (r, in)
        tensors[f"base_model.model.{path}.lora_B.weight"] = layer.lora_B  # (out, r)
    out = Path(out_dir)
    write_safetensors_atomic(out / "adapter_model.safetensors", tensors)
    alpha = alphas.pop()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": ranks.pop(),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": sorted(target_modules),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "base_model_name_or_path": str(base_model_name_or_path),
    }
    write_json_atomic(out / "adapter_config.json", config)
    return out


def save_multilora(
    layers: Mapping[str, MultiLoRALinear],
    out_dir: str | os.PathLike,
    base_model_name_or_path: str,
    target_modules: list[str],
) -> Path:
    """Write a MultiLoRA folder (stacked A, B and scaling tensors plus the JSON config)."""
    if not layers:
        raise ValueError("no MultiLoRA layers to save")
    first = next(iter(layers.values()))
    for layer in layers.values():
        same = (layer.n, layer.r, layer.alpha, layer.scaling_shape)
        if same != (first.n, first.r, first.alpha, first.scaling_shape):
            raise ValueError("all MultiLoRA layers must share n, r, alpha and scaling shape")
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in layers.items():
        tensors[f"{path}.lora_A"] = layer.lora_A  # (n, r, in)
        tensors[f"{path}.lora_B"] = layer.lora_B  # (n, out, r)
        tensors[f"{path}.lora_scaling"] = layer.lora_scaling  # (n,) or (n, out)
    out = Path(out_dir)
    write_safetensors_atomic(out / "multilora_model.safetensors", tensors)
    alpha = first.alpha
    config = {
        "format": "multilora",
        "version": 1,
        "n": first.n,
        "r": first.r,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "scaling_shape": first.scaling_shape,
        "target_modules": sorted(target_modules),
        "base_model_name_or_path": str(base_model_name_or_path),
    }
    write_json_atomic(out / "multilora_config.json", config)
    return out
