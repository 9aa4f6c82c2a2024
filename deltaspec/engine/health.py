"""Engine side of the health columns: the sums over W and ΔW that ``lost_in_bf16`` and
``bf16_merge_error`` take (:mod:`deltaspec.metrics.health`), and the base weight's heavy-tail
exponent — from the operands the analysis already streams, in float64 row blocks, never a
whole matrix in float64 (a factored ΔW's block B[rows]·A is formed only here, block by block).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deltaspec.engine.kernels import Operand
from deltaspec.engine.relative import BaseEigs
from deltaspec.engine.spectrum import Spectrum, solve_dense
from deltaspec.metrics import health as H
from deltaspec.metrics import heavy_tail
from deltaspec.options import Options


def merge_rounding(w: Operand, op: Operand, dtype: str = "bfloat16") -> tuple[int, int, float, float]:
    """(entries lost, entries, ‖round(W + ΔW) − W − ΔW‖²_F, ‖ΔW‖²_F) for W + ΔW stored in
    ``dtype``, summed over row blocks of the two operands (sized so that merge_block's
    temporaries stay within the memory guard)."""
    m, n = w.shape
    lost, err2, d2 = 0, 0.0, 0.0
    step = max(1, w.step(True) // 4)  # ~6 float64 blocks live in merge_block
    for lo in range(0, m, step):
        hi = min(lo + step, m)
        dw = op.rows(lo, hi).to(w.device)
        part = H.merge_block(w.rows(lo, hi), dw, dtype)
        lost, err2, d2 = lost + part[0], err2 + part[1], d2 + part[2]
    return lost, m * n, err2, d2


def health_metrics(w: Operand, op: Operand, dtype: str, zero: bool) -> dict[str, Any]:
    """``lost_in_bf16`` and ``bf16_merge_error`` of ΔW = ``op`` against W = ``w`` (``zero``: ΔW
    is known to be exactly zero — every entry is lost, the error undefined, nothing is read)."""
    if zero:
        return {"lost_in_bf16": 1.0, "bf16_merge_error": math.nan}
    stored = _stored_in(op, w, dtype)
    if stored is not None:  # W + ΔW is the tuned tensor, already in dtype: nothing rounds
        lost = int((stored[0] == stored[1]).sum())  # |ΔWᵢⱼ| ≥ ½ ulp(Wᵢⱼ) unless ΔWᵢⱼ = 0
        return {"lost_in_bf16": H.lost_share(lost, stored[0].numel()), "bf16_merge_error": 0.0}
    lost, entries, err2, d2 = merge_rounding(w, op, dtype)
    return {"lost_in_bf16": H.lost_share(lost, entries), "bf16_merge_error": H.merge_error(err2, d2)}


def _stored_in(op: Operand, w: Operand, dtype: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tuned, base) when ΔW = tuned − base with both stored in ``dtype`` and W is that base (a
    full fine-tune saved in bf16): then round(W + ΔW) = tuned exactly, and an entry is lost only
    where ΔWᵢⱼ = 0 (two distinct numbers of a format differ by at least half the larger one's
    ulp) — one comparison instead of the float64 pass."""
    if op.factored or len(op.dense) != 2 or len(w.dense) != 1 or w.factored:
        return None
    (c1, t), (c2, b) = op.dense
    want = getattr(torch, dtype)
    if c1 == 1.0 and c2 == -1.0 and t.dtype == b.dtype == want and w.dense[0][1] is b:
        return t, b
    return None


def base_columns(sp: Spectrum, op: Operand, w: Operand, opts: Options,
                 eigs: BaseEigs) -> dict[str, Any]:
    """One side's health columns against its base W (``w``) beyond the spectral ``untrained``
    (α of ΔW is a spectral column: :func:`deltaspec.rows.side_metrics`): the merge columns in
    ``opts.merge_dtype``; with ``opts.heavy_tail``, α of W (from the intruder count's
    decomposition when it was made, ``eigs``)."""
    out = health_metrics(w, op, opts.merge_dtype, not bool(sp.values.any()))
    if opts.heavy_tail:
        out["alpha_base"] = base_alpha(w, eigs.of(w).s if opts.intruders else None)
    return out


def base_alpha(w: Operand, values: torch.Tensor | None = None) -> float:
    """The heavy-tail α of the base weight's ESD: from W's singular values ``values`` when the
    analysis has them already (the intruder count's decomposition), else one values-only solve."""
    if values is None:
        values = solve_dense(w, 0).values
    return heavy_tail.alpha(values.to("cpu", torch.float64).numpy(), w.shape)


__all__ = ["base_alpha", "base_columns", "health_metrics", "merge_rounding"]
