"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

ΔW = B·A·s with s = α/r (α/√r with rsLoRA), per-module r and α from ``rank_pattern`` /
``alpha_pattern`` resolved the way PEFT resolves them. Variants plug in through ``_BUILDERS``:
a table from the kind of module (linear, embedding, DoRA, full weight) to the function that
turns its tensors into a :class:`Delta`. PEFT's own ``get_delta_weight`` is the reference.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError, UnsupportedError, UsageError
from deltaspec.loaders.full import Checkpoint
from deltaspec.loaders.store import TensorStore, read_json
from deltaspec.names import strip_peft_prefix

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
MODIFIES_BASE = ("pissa", "olora", "corda", "lora_ga", "loftq", "eva")
_PART = re.compile(
    r"^(?P<mod>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector)(?:\.[^.]+)?(?:\.(?P<leaf>weight|bias))?$"
)


@dataclass
class _Module:
    """The tensors of one adapted module, by part name (``lora_A``, ``lora_B.bias``, …)."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)


def find_adapter_dir(path: Path) -> Path | None:
    """``path`` itself, or its one sub-folder named after an adapter, that holds the config."""
    if (path / CONFIG).is_file():
        return path
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
    if len(subs) > 1:
        names = ", ".join(p.name for p in subs)
        raise UsageError(f"{path}: holds several adapters ({names}); pass one of those folders")
    return subs[0] if subs else None


def detect(path: Path) -> bool:
    """True for a PEFT adapter folder (or a folder holding exactly one in a sub-folder)."""
    return find_adapter_dir(path) is not None


@dataclass
class _Ctx:
    """What every builder needs: the store, config, scaling rules and the optional base."""

    store: TensorStore
    config: dict[str, Any]
    base: Checkpoint | None
    source: str
    skipped: list[tuple[str, str]]

    def scale(self, module: str, r: int) -> float:
        alpha = float(_pattern(self.config.get("alpha_pattern") or {}, module,
                               self.config.get("lora_alpha", 8)))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def get(self, key: str) -> torch.Tensor:
        return self.store.get(key).to(torch.float32)


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first key k (dict order) with ``(.*\\.)?(k)$`` matching."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_peft(path: Path, base: Checkpoint | None, skipped: list[tuple[str, str]], *,
              allow_modified_base: bool = False) -> dict[str, Delta]:
    """Every module's ΔW in a PEFT LoRA adapter folder."""
    folder = find_adapter_dir(path)
    if folder is None:
        raise CheckpointError(f"{path}: no {CONFIG} here")
    config = read_json(folder / CONFIG)
    _check_config(folder / CONFIG, config, allow_modified_base)
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")
    store = TensorStore.from_files([weights])
    ctx = _Ctx(store, config, base, str(weights), skipped)
    modules, full = _group(store.keys())
    out: dict[str, Delta] = {}
    for mod in modules.values():
        out[mod.name] = _build(ctx, mod)
    for name, key in full.items():
        d = _full_weight(ctx, name, key)
        if d is not None:
            out[name] = d
    if not out and not skipped:
        raise CheckpointError(f"{weights}: the adapter holds no LoRA tensors")
    return out


def _check_config(path: Path, config: dict[str, Any], allow_modified_base: bool) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedError(f"{path}: peft_type {config.get('peft_type')!r} is not supported "
                               "(deltaspec reads LORA adapters and MultiLoRA checkpoints)")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(m) for m in MODIFIES_BASE) and not allow_modified_base:
        raise UnsupportedError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} changed the base weights, "
            "so s·B·A is not the update of the original base; re-save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion, or pass --allow-modified-base")
    if config.get("layer_replication"):
        raise UnsupportedError(f"{path}: layer_replication adapters are not supported")
    for key in ("r", "lora_alpha"):
        if key in config and not isinstance(config[key], (int, float)):
            raise ConfigError(f"{path}: {key!r} must be a number, not {config[key]!r}")


def _group(keys: list[str]) -> tuple[dict[str, _Module], dict[str, str]]:
    modules: dict[str, _Module] = {}
    full: dict[str, str] = {}
    for key in keys:
        name = strip_peft_prefix(key)
        m = _PART.match(name)
        if m:
            mod = modules.setdefault(m["mod"], _Module(m["mod"]))
            part = m["part"] + (".bias" if m["leaf"] == "bias" else "")
            mod.keys[part] = key
        elif name.endswith(".weight"):
            full[name[: -len(".weight")].removesuffix(".base_layer")] = key
    return modules, full


def _build(ctx: _Ctx, mod: _Module) -> Delta:
    kind = "embedding" if "lora_embedding_A" in mod.keys else "linear"
    if "lora_magnitude_vector" in mod.keys:
        kind = "dora"
    needed = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
    for part in needed:
        if part not in mod.keys:
            raise CheckpointError(f"{ctx.source}: module {mod.name!r} has no {part} tensor")
    return _BUILDERS[kind](ctx, mod)


def _linear_factors(ctx: _Ctx, mod: _Module) -> tuple[tuple[int, int], int, Callable[[], _delta.Factors]]:
    a_shape, b_shape = ctx.store.shape(mod.keys["lora_A"]), ctx.store.shape(mod.keys["lora_B"])
    r = a_shape[0]
    if len(b_shape) < 2 or b_shape[1] != r:
        raise CheckpointError(f"{ctx.source}: {mod.name}: lora_B shape {b_shape} does not match "
                              f"lora_A shape {a_shape}")
    shape = (b_shape[0], math.prod(a_shape[1:]))  # conv kernels flatten to (out, in·k…)
    s = ctx.scale(mod.name, r)

    def load() -> _delta.Factors:
        b = ctx.get(mod.keys["lora_B"]).reshape(shape[0], r)  # (out, r)
        a = ctx.get(mod.keys["lora_A"]).reshape(r, shape[1])  # (r, in)
        return b * s, a

    return shape, r, load


def _bias(ctx: _Ctx, mod: _Module) -> Callable[[], torch.Tensor] | None:
    key = mod.keys.get("lora_B.bias")
    return (lambda: ctx.get(key)) if key else None


def _base_thunk(ctx: _Ctx, name: str, shape: tuple[int, int]) -> Callable[[], torch.Tensor] | None:
    if ctx.base is None:
        return None
    return ctx.base.oriented(name, shape, bool(ctx.config.get("fan_in_fan_out")))


def _linear(ctx: _Ctx, mod: _Module) -> Delta:
    shape, r, load = _linear_factors(ctx, mod)
    return _delta.factored(mod.name, shape, load, method="lora", source=ctx.source, rank=r,
                           base=_base_thunk(ctx, mod.name, shape), bias=_bias(ctx, mod))


def _embedding(ctx: _Ctx, mod: _Module) -> Delta:
    a_key, b_key = mod.keys["lora_embedding_A"], mod.keys["lora_embedding_B"]
    r, num = ctx.store.shape(a_key)  # A: (r, num_embeddings)
    dim = ctx.store.shape(b_key)[0]  # B: (dim, r)
    s = ctx.scale(mod.name, r)

    def load() -> _delta.Factors:
        # ΔW = (B·A)ᵀ·s = (Aᵀ·s)·Bᵀ: (num_embeddings, r) @ (r, dim)
        return ctx.get(a_key).T * s, ctx.get(b_key).T

    return _delta.factored(mod.name, (num, dim), load, method="lora", source=ctx.source, rank=r,
                           base=_base_thunk(ctx, mod.name, (num, dim)))


def _dora(ctx: _Ctx, mod: _Module) -> Delta:
    shape, _, factors = _linear_factors(ctx, mod)
    base = _base_thunk(ctx, mod.name, shape)
    if base is None:
        raise UsageError(f"{ctx.source}: {mod.name} is a DoRA module; its update depends on the "
                         "base weight, so pass --base")
    mkey = mod.keys["lora_magnitude_vector"]

    def load() -> torch.Tensor:
        b, a = factors()
        w0 = base().to(torch.float64)
        w = w0 + b.to(torch.float64) @ a.to(torch.float64)  # (out, in)
        norm = w.norm(p=2, dim=1, keepdim=True)  # per output row, as PEFT's DoRA
        m = ctx.get(mkey).to(torch.float64).reshape(-1, 1)
        return (m / norm * w - w0).to(torch.float32)

    return _delta.dense(mod.name, shape, load, method="dora", source=ctx.source, base=base,
                        bias=_bias(ctx, mod))


def _full_weight(ctx: _Ctx, name: str, key: str) -> Delta | None:
    """A full weight saved in the adapter (modules_to_save, base_layer): saved − base."""
    stored = ctx.store.shape(key)
    if len(stored) != 2:
        ctx.skipped.append((name, f"{len(stored)}-D full weight"))
        return None
    if ctx.base is None:
        ctx.skipped.append((name, "full weight (modules_to_save); pass --base to analyse it"))
        return None
    base_key = ctx.base.find(name + ".weight")
    if base_key is None:
        ctx.skipped.append((name, "full weight not in the base"))
        return None
    if ctx.base.store.shape(base_key) != stored:
        from deltaspec.errors import ShapeError

        raise ShapeError(f"{ctx.source}: {key} has shape {stored} but the base has "
                         f"{ctx.base.store.shape(base_key)}")
    base_w = ctx.base

    def load() -> torch.Tensor:
        return ctx.get(key) - base_w.tensor(base_key)

    return _delta.dense(name, stored, load, method="modules_to_save", source=ctx.source,
                        base=lambda: base_w.tensor(base_key))


_BUILDERS: dict[str, Callable[[_Ctx, _Module], Delta]] = {
    "linear": _linear,
    "embedding": _embedding,
    "dora": _dora,
}
