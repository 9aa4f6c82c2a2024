"""PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``).

ΔW = B·A·s with s = α/r (α/√r with rsLoRA), per-module α from ``alpha_pattern`` resolved the way
PEFT resolves it (:mod:`deltaspec.loaders.peft.config`); r is the tensors' own rank. Key names are
those PEFT 0.21 writes (adapter name stripped; an unstripped one is tolerated)::

    <module>.lora_A.weight (r, in[, k…])   <module>.lora_B.weight (out, r[, 1…])   <module>.lora_B.bias
    <module>.lora_embedding_A (r, num)     <module>.lora_embedding_B (dim, r)
    <module>.lora_magnitude_vector (out,)  (DoRA; (dim,) for an embedding)
    <module>.base_layer.weight             (an embedding layer saved along: the base weight)
    <module>.weight / .bias                (modules_to_save: full weights)
    <module>.token_adapter.trainable_tokens_delta (n, dim)  (trainable_token_indices)

Variants plug in through ``_BUILDERS`` (module kind → function making its :class:`Delta`).
PEFT's own ``get_delta_weight`` and DoRA merge (peft/tuners/lora/layer.py, variants.py) are the
reference; the tests use PEFT's ``merge_and_unload`` as the oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, UsageError
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import LoadOptions, Skipped
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import config as peft_config
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft import keys as lora_keys
from deltaspec.loaders.peft.common import Ctx

PEFT_TYPES = ("LORA",)
detect = peft_common.detector(*PEFT_TYPES)


def load(folder: Path, base: Checkpoint | None, opts: LoadOptions,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's ΔW in a PEFT LoRA adapter folder."""
    ctx = peft_common.open_adapter(folder, base, skipped)
    peft_config.check_config(ctx.config_path, ctx.config, opts.allow_modified_base)
    groups = lora_keys.group(ctx.store.keys())
    ctx.base_layers = groups.base_layer
    out: dict[str, Delta] = {mod.name: _build(ctx, mod) for mod in groups.lora.values()}
    for name, keys in groups.base_layer.items():
        if name not in out:  # a base layer without LoRA on it is loaded as a full weight
            groups.full.setdefault(name, keys)
    extras = peft_extras.full_weights(ctx, groups.full) | peft_extras.trainable_tokens(ctx, groups.tokens)
    for name, d in extras.items():
        if name in out:
            raise CheckpointError(f"{ctx.source}: module {name!r} holds both LoRA factors and a "
                                  f"{d.method} update")
        out[name] = d
    skipped.extend((key, "not a LoRA tensor deltaspec knows") for key in groups.other)
    if not out and not skipped:
        raise CheckpointError(f"{ctx.source}: the adapter holds no LoRA tensors")
    return out


def _build(ctx: Ctx, mod: lora_keys.Module) -> Delta:
    kind = "embedding" if "lora_embedding_A" in mod.keys else "linear"
    needed = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
    for part in needed:
        if part not in mod.keys:
            raise CheckpointError(f"{ctx.source}: module {mod.name!r} has no {part} tensor")
    if "lora_magnitude_vector" in mod.keys:
        kind = "dora"
    return _BUILDERS[kind](ctx, mod)


Thunk = Callable[[], _delta.Factors]


def _linear_factors(ctx: Ctx, mod: lora_keys.Module) -> tuple[tuple[int, int], int, float, Thunk]:
    """Shape (out, in·k…), rank, scale and the (B·s, A) thunk of a linear or conv LoRA module."""
    a_shape, b_shape = ctx.store.shape(mod.keys["lora_A"]), ctx.store.shape(mod.keys["lora_B"])
    if len(a_shape) < 2 or len(b_shape) < 2 or b_shape[1] != a_shape[0] \
            or math.prod(b_shape[2:]) != 1:
        raise CheckpointError(f"{ctx.source}: {mod.name}: lora_B shape {b_shape} does not match "
                              f"lora_A shape {a_shape}")
    r = _rank(ctx, mod, a_shape[0], "lora_A")
    shape = (b_shape[0], math.prod(a_shape[1:]))  # conv kernels flatten to (out, in·k…)
    s = peft_config.scale(ctx.config, mod.name, r)

    def load() -> _delta.Factors:
        b = ctx.get(mod.keys["lora_B"]).reshape(shape[0], r)  # (out, r)
        a = ctx.get(mod.keys["lora_A"]).reshape(r, shape[1])  # (r, in)
        return b * s, a

    return shape, r, s, load


def _embedding_factors(ctx: Ctx, mod: lora_keys.Module) -> tuple[tuple[int, int], int, float, Thunk]:
    """Embedding LoRA: ΔW = (B·A)ᵀ·s = (Aᵀ·s)·Bᵀ of shape (num_embeddings, dim)."""
    a_key, b_key = mod.keys["lora_embedding_A"], mod.keys["lora_embedding_B"]
    a_shape, b_shape = ctx.store.shape(a_key), ctx.store.shape(b_key)
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
        raise CheckpointError(f"{ctx.source}: {mod.name}: lora_embedding_B shape {b_shape} does "
                              f"not match lora_embedding_A shape {a_shape}")
    (r, num), dim = a_shape, b_shape[0]
    r = _rank(ctx, mod, r, "lora_embedding_A")
    s = peft_config.scale(ctx.config, mod.name, r)

    def load() -> _delta.Factors:
        return ctx.get(a_key).T * s, ctx.get(b_key).T  # (num, r) @ (r, dim)

    return (num, dim), r, s, load


def _rank(ctx: Ctx, mod: lora_keys.Module, r: int, part: str) -> int:
    """The rank read from the tensors' shapes; 0 is refused as PEFT refuses ``r`` ≤ 0."""
    if r <= 0:
        raise CheckpointError(f"{ctx.source}: tensor {mod.keys[part]!r} has rank {r} (an r = 0 "
                              "adapter; PEFT refuses r ≤ 0)")
    return r


def _bias(ctx: Ctx, mod: lora_keys.Module, s: float, out: int) -> Callable[[], torch.Tensor] | None:
    """The bias update: lora_B.bias·s (``lora_bias=True``; PEFT's merge adds exactly this) plus,
    for ``bias="all"``/``"lora_only"``, the trained base_layer.bias minus the base's bias."""
    key = mod.keys.get("lora_B.bias")
    if key is not None and ctx.store.shape(key) != (out,):
        raise CheckpointError(f"{ctx.source}: {key} has shape {ctx.store.shape(key)}, not ({out},)")
    trained = peft_extras.trained_bias(ctx, mod.name, ctx.base_layers.get(mod.name, {}).get("bias"), out)
    if key is None:
        return trained
    return lambda: ctx.get(key) * s + (trained() if trained is not None else 0.0)


def _fan_in_fan_out(ctx: Ctx) -> bool:
    return bool(ctx.config.get("fan_in_fan_out"))


def _linear(ctx: Ctx, mod: lora_keys.Module) -> Delta:
    shape, r, s, load = _linear_factors(ctx, mod)
    base = ctx.base_weight(mod.name, shape, _fan_in_fan_out(ctx))
    return _delta.factored(mod.name, shape, load, method="lora", source=ctx.source, rank=r,
                           base=base, bias=_bias(ctx, mod, s, shape[0]))


def _embedding(ctx: Ctx, mod: lora_keys.Module) -> Delta:
    shape, r, _, load = _embedding_factors(ctx, mod)
    return _delta.factored(mod.name, shape, load, method="lora", source=ctx.source, rank=r,
                           base=ctx.base_weight(mod.name, shape, False))


def _dora(ctx: Ctx, mod: lora_keys.Module) -> Delta:
    """DoRA: W′ = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, ΔW = W′ − W0 (dense; needs the base).

    The norm is taken per output row for linear/conv layers and per embedding dimension (column)
    for embeddings, as in PEFT's DoraLinearVariant / DoraEmbeddingVariant merges.
    """
    is_embedding = "lora_embedding_A" in mod.keys
    builder = _embedding_factors if is_embedding else _linear_factors
    shape, _, s, factors = builder(ctx, mod)
    base = ctx.base_weight(mod.name, shape, False if is_embedding else _fan_in_fan_out(ctx))
    if base is None:
        raise UsageError(f"{ctx.source}: {mod.name} is a DoRA module; its update depends on the "
                         "base weight, so pass --base")
    mkey, axis = mod.keys["lora_magnitude_vector"], 0 if is_embedding else 1
    m_shape = ctx.store.shape(mkey)
    if math.prod(m_shape) != shape[1 - axis]:
        raise CheckpointError(f"{ctx.source}: {mkey} has shape {m_shape}; expected "
                              f"({shape[1 - axis]},) for an update of shape {shape}")
    base_w = base

    def load() -> torch.Tensor:
        b, a = factors()
        w0 = base_w().to(torch.float64)
        w = w0 + b.to(torch.float64) @ a.to(torch.float64)
        norm = w.norm(p=2, dim=axis, keepdim=True)
        m = ctx.get(mkey).to(torch.float64).reshape(norm.shape)
        return (m / norm * w - w0).to(torch.float32)

    return _delta.dense(mod.name, shape, load, method="dora", source=ctx.source, base=base,
                        bias=None if is_embedding else _bias(ctx, mod, s, shape[0]))


_BUILDERS: dict[str, Callable[[Ctx, lora_keys.Module], Delta]] = {
    "linear": _linear,
    "embedding": _embedding,
    "dora": _dora,
}
