"""PEFT LoHa adapters (``peft_type: LOHA``): ΔW = (W₁ₐ·W₁ᵦ) ⊙ (W₂ₐ·W₂ᵦ)·α/r, kept factored.

The Hadamard product of two rank-r products is the product of their row-wise Khatri–Rao
products: (B₁A₁) ⊙ (B₂A₂) = (B₁ ⊙ᵣ B₂)·(A₁ᵀ ⊙ᵣ A₂ᵀ)ᵀ with (B₁ ⊙ᵣ B₂)[i, (p, q)] = B₁[i, p]·B₂[i, q],
so ΔW is an exact factored delta of rank ≤ r₁·r₂, never formed — unless r₁·r₂ ≥ min(out, in),
where those factors would outweigh ΔW itself and ΔW is formed densely instead (memory checked
first). Keys (PEFT ``loha/layer.py``):
``hada_w{1,2}_a`` (out, r), ``hada_w{1,2}_b`` (r, in·k…); with ``use_effective_conv2d`` (Tucker)
``hada_t{1,2}`` (r, r, kh, kw) and ``hada_w{1,2}_a`` (r, out), ``hada_w{1,2}_b`` (r, in), each
factor being W = w_aᵀ·(t ×₂ w_bᵀ) flattened to (out, in·kh·kw) — conv modules flatten like LoRA's.
r and α per module from ``rank_pattern`` / ``alpha_pattern`` as PEFT resolves them.
"""

from __future__ import annotations

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta, check_bytes
from deltaspec.errors import CheckpointError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import config as peft_config
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("LOHA",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
SCHEMA: schema.Schema = {
    "r": schema.Key("int", 1, schema.MAX_RANK),
    "alpha": schema.Key("number"),
    "rank_pattern": schema.Key("mapping", nullable=True),
    "alpha_pattern": schema.Key("mapping", nullable=True),
    "use_effective_conv2d": schema.Key("bool"),
    "decompose_both": schema.Key("bool"),
    "decompose_factor": schema.Key("int", -1, schema.MAX_RANK),
}


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's factored ΔW in a PEFT LoHa adapter folder."""
    return peft_extras.load_modules(folder, base, skipped, parts=PARTS, what="LoHa",
                                    module=_module, config_schema=SCHEMA)


def lycoris_scale(ctx: Adapter, name: str) -> tuple[int, float]:
    """(r, α/r) of module ``name``: ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT does."""
    r = peft_config.pattern_value(ctx.config.get("rank_pattern"), name, ctx.config.get("r", 8))
    alpha = peft_config.pattern_value(ctx.config.get("alpha_pattern"), name,
                                      ctx.config.get("alpha", 8))
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0 \
            or not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise CheckpointError(f"{ctx.config_path}: module {name!r} has r={r!r}, alpha={alpha!r}; "
                              "expected a positive integer and a number")
    return r, alpha / r


def factor_pair(ctx: Adapter, name: str, a: str, b: str, t: str | None) -> tuple[tuple[int, int], int]:
    """Shape (out, in·k…) and rank of one factor w_a·w_b (Tucker: with core ``t``), checked."""
    a_shape, b_shape = ctx.shape(a), ctx.shape(b)
    if t is None:
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[1] != b_shape[0]:
            raise CheckpointError(f"{ctx.source}: {name}: {a} {a_shape} and {b} {b_shape} do not "
                                  "multiply")
        return (a_shape[0], b_shape[1]), a_shape[1]
    t_shape = ctx.shape(t)
    if len(a_shape) != 2 or len(b_shape) != 2 or len(t_shape) != 4 \
            or t_shape[:2] != (a_shape[0], b_shape[0]):
        raise CheckpointError(f"{ctx.source}: {name}: Tucker core {t} {t_shape} does not fit "
                              f"{a} {a_shape} and {b} {b_shape}")
    return (a_shape[1], b_shape[1] * t_shape[2] * t_shape[3]), a_shape[0]


def factor_value(ctx: Adapter, a: str, b: str, t: str | None) -> _delta.Factors:
    """(B, A) of one factor in float64: (w_a, w_b), or Tucker (w_aᵀ, (t ×₂ w_bᵀ) flattened)."""
    wa, wb = ctx.get64(a), ctx.get64(b)
    if t is None:
        return wa, wb
    core = torch.einsum("ijkl,jc->ickl", ctx.get64(t), wb)  # (r, in, kh, kw)
    return wa.T, core.reshape(core.shape[0], -1)


def _module(ctx: Adapter, _base: Checkpoint | None, name: str, keys: dict[str, str]) -> Delta:
    tucker = "hada_t1" in keys or "hada_t2" in keys
    needed = PARTS if tucker else PARTS[:4]
    for part in needed:
        if part not in keys:
            raise CheckpointError(f"{ctx.source}: module {name!r} has no {part} tensor")
    sides = [(keys[f"hada_w{i}_a"], keys[f"hada_w{i}_b"], keys.get(f"hada_t{i}")) for i in (1, 2)]
    (shape1, r1), (shape2, r2) = (factor_pair(ctx, name, *side) for side in sides)
    if shape1 != shape2:
        raise CheckpointError(f"{ctx.source}: {name}: the two Hadamard factors have shapes "
                              f"{shape1} and {shape2}")
    _, s = lycoris_scale(ctx, name)

    base = ctx.base_weight(name, shape1, None)
    if r1 * r2 >= min(shape1):  # the Khatri–Rao factors would outweigh ΔW itself: go dense
        check_bytes(8 * (shape1[0] * shape1[1] + (r1 + r2) * sum(shape1)), f"{ctx.source}: {name}")

        def dense() -> torch.Tensor:
            (b1, a1), (b2, a2) = (factor_value(ctx, *side) for side in sides)
            return (b1 @ a1) * (b2 @ a2) * s

        return _delta.dense(name, shape1, dense, method="loha", source=ctx.source, base=base)

    def load() -> _delta.Factors:
        (b1, a1), (b2, a2) = (factor_value(ctx, *side) for side in sides)
        b = (b1[:, :, None] * b2[:, None, :]).reshape(shape1[0], r1 * r2)  # row-wise Khatri–Rao
        a = (a1[:, None, :] * a2[None, :, :]).reshape(r1 * r2, shape1[1])
        return b * s, a

    return _delta.factored(name, shape1, load, method="loha", source=ctx.source, rank=r1 * r2,
                           base=base)
