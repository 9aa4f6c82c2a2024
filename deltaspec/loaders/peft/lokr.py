"""PEFT LoKr adapters (``peft_type: LOKR``): ΔW = (W₁ ⊗ W₂)·α/r, kept as its two Kronecker factors.

W₁ is ``lokr_w1`` (a, c) or ``lokr_w1_a``·``lokr_w1_b`` (``decompose_both``); W₂ is ``lokr_w2``
(b, d[, kh, kw]), ``lokr_w2_a``·``lokr_w2_b``, or with ``use_effective_conv2d`` the Tucker form
w₂ₐᵀ·(t₂ ×₂ w₂ᵦᵀ) (PEFT ``lokr/layer.py``: ``make_kron``, ``make_weight_cp``). A conv kernel
flattens to (out, in·kh·kw) = (a·b, c·d·kh·kw), which is exactly W₁ ⊗ W₂ with W₂ flattened to
(b, d·kh·kw). The engine's Kronecker route takes σ as the pairwise products of the factors' σ —
exact, never dense. The scale is α/r with r, α from the config (``rank_pattern`` /
``alpha_pattern``), also when both factors are full matrices (PEFT scales those by α/r too).
"""

from __future__ import annotations

from deltaspec import delta as _delta
from deltaspec.delta import Delta, KronFactor
from deltaspec.errors import CheckpointError
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft import loha
from deltaspec.loaders.peft.common import Adapter
from deltaspec.loaders.peft.loha import factor_pair, factor_value, lycoris_scale
from deltaspec.options import Options

PEFT_TYPES = ("LOKR",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's Kronecker ΔW in a PEFT LoKr adapter folder."""
    return peft_extras.load_modules(folder, base, skipped, parts=PARTS, what="LoKr",
                                    module=_module, config_schema=loha.SCHEMA)


Side = tuple[str, str | None, str | None]  # (full key | a key, b key, Tucker core key)


def _side(ctx: Adapter, name: str, keys: dict[str, str], i: int) -> tuple[Side, tuple[int, int], int]:
    """Factor ``i``: its keys, its (rows, cols·k…) shape and a rank bound."""
    full, a, b, t = (keys.get(f"lokr_w{i}"), keys.get(f"lokr_w{i}_a"), keys.get(f"lokr_w{i}_b"),
                     keys.get(f"lokr_t{i}"))
    if full is not None and a is None and b is None and t is None:
        shape = ctx.shape(full)
        if len(shape) < 2:
            raise CheckpointError(f"{ctx.source}: {name}: lokr_w{i} has shape {shape}")
        flat = (shape[0], _prod(shape[1:]))
        return (full, None, None), flat, min(flat)
    if full is None and a is not None and b is not None:
        flat, r = factor_pair(ctx, name, a, b, t)
        return (a, b, t), flat, min(r, *flat)
    raise CheckpointError(f"{ctx.source}: module {name!r}: Kronecker factor {i} needs lokr_w{i} "
                          f"or lokr_w{i}_a and lokr_w{i}_b")


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def _value(ctx: Adapter, side: Side, scale: float) -> KronFactor:
    first, b, t = side
    if b is None:
        w = ctx.get64(first)
        return w.reshape(w.shape[0], -1) * scale
    bf, af = factor_value(ctx, first, b, t)
    return bf * scale, af


def _module(ctx: Adapter, _base: Checkpoint | None, name: str, keys: dict[str, str]) -> Delta:
    (side1, (a, c), r1), (side2, (b, d), r2) = (_side(ctx, name, keys, i) for i in (1, 2))
    if len(ctx.shape(side1[0])) != 2:
        raise CheckpointError(f"{ctx.source}: {name}: the first Kronecker factor must be a matrix")
    _, s = lycoris_scale(ctx, name)
    shape = (a * b, c * d)

    def load() -> tuple[KronFactor, KronFactor]:
        return _value(ctx, side1, s), _value(ctx, side2, 1.0)

    return _delta.kronecker(name, shape, load, method="lokr", source=ctx.source, rank=r1 * r2,
                            base=ctx.base_weight(name, shape, None))
