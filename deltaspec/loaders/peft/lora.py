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

import torch

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, UsageError
from deltaspec.loaders import build
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import config as peft_config
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft import keys as lora_keys
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("LORA",)
detect = peft_common.detector(*PEFT_TYPES)


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's ΔW in a PEFT LoRA adapter folder."""
    ctx = peft_common.open_adapter(folder, base, skipped)
    peft_config.check_config(ctx.config_path, ctx.config, opts.allow_modified_base)
    groups = peft_common.group(ctx, lora_keys.LORA_PARTS)
    out: dict[str, Delta] = {mod.name: _build(ctx, mod) for mod in groups.modules.values()}
    return peft_extras.finish(ctx, out, groups, "LoRA", require=False)


def _build(ctx: Adapter, mod: lora_keys.Module) -> Delta:
    kind = "embedding" if "lora_embedding_A" in mod.keys else "linear"
    needed = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A", "lora_B")
    for part in needed:
        if part not in mod.keys:
            raise CheckpointError(f"{ctx.source}: module {mod.name!r} has no {part} tensor")
    if "lora_magnitude_vector" in mod.keys:
        kind = "dora"
    return _BUILDERS[kind](ctx, mod)


def _factors(ctx: Adapter, mod: lora_keys.Module) -> build.Factors:
    """Linear/conv LoRA: ΔW = (B·s)·A of shape (out, in·k…); embedding LoRA: ΔW = (B·A)ᵀ·s of
    shape (num_embeddings, dim)."""
    embedding = "lora_embedding_A" in mod.keys
    a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    f = build.lora_factors(ctx.store, ctx.source, mod.name, mod.keys[a], mod.keys[b],
                           lambda r: peft_config.scale(ctx.config, mod.name, r))
    return build.transposed(f) if embedding else f


def _bias(ctx: Adapter, mod: lora_keys.Module, s: float, out: int) -> Callable[[], torch.Tensor] | None:
    """The bias update: lora_B.bias·s (``lora_bias=True``; PEFT's merge adds exactly this) plus,
    for ``bias="all"``/``"lora_only"``, the trained base_layer.bias minus the base's bias."""
    key = mod.keys.get("lora_B.bias")
    if key is not None and ctx.store.shape(key) != (out,):
        raise CheckpointError(f"{ctx.source}: {key} has shape {ctx.store.shape(key)}, not ({out},)")
    trained = peft_extras.trained_bias(ctx, mod.name, ctx.base_layers.get(mod.name, {}).get("bias"), out)
    if key is None:
        return trained
    return lambda: ctx.get(key) * s + (trained() if trained is not None else 0.0)


def _fan_in_fan_out(ctx: Adapter) -> bool:
    return bool(ctx.config.get("fan_in_fan_out"))


def _linear(ctx: Adapter, mod: lora_keys.Module) -> Delta:
    f = _factors(ctx, mod)
    return build.factored(mod.name, f, method="lora", source=ctx.source,
                          base=ctx.base_weight(mod.name, f.shape, _fan_in_fan_out(ctx)),
                          bias=_bias(ctx, mod, f.scale, f.shape[0]))


def _embedding(ctx: Adapter, mod: lora_keys.Module) -> Delta:
    f = _factors(ctx, mod)
    return build.factored(mod.name, f, method="lora", source=ctx.source,
                          base=ctx.base_weight(mod.name, f.shape, False))


def _dora(ctx: Adapter, mod: lora_keys.Module) -> Delta:
    """DoRA: W′ = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖, ΔW = W′ − W0 (dense; needs the base).

    The norm is taken per output row for linear/conv layers and per embedding dimension (column)
    for embeddings, as in PEFT's DoraLinearVariant / DoraEmbeddingVariant merges.
    """
    is_embedding = "lora_embedding_A" in mod.keys
    f = _factors(ctx, mod)
    shape = f.shape
    base = ctx.base_weight(mod.name, shape, False if is_embedding else _fan_in_fan_out(ctx))
    if base is None:
        raise UsageError(f"{ctx.source}: {mod.name} is a DoRA module; its update depends on the "
                         "base weight, so pass --base")
    mkey, axis = mod.keys["lora_magnitude_vector"], 0 if is_embedding else 1
    m_shape = ctx.store.shape(mkey)
    if math.prod(m_shape) != shape[1 - axis]:
        raise CheckpointError(f"{ctx.source}: {mkey} has shape {m_shape}; expected "
                              f"({shape[1 - axis]},) for an update of shape {shape}")
    return build.dora(mod.name, shape, f.load, base, lambda: ctx.get(mkey), axis=axis,
                      source=ctx.source,
                      bias=None if is_embedding else _bias(ctx, mod, f.scale, shape[0]))


_BUILDERS: dict[str, Callable[[Adapter, lora_keys.Module], Delta]] = {
    "linear": _linear,
    "embedding": _embedding,
    "dora": _dora,
}
