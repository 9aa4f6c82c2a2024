"""Singular values by a float32 SVD with a float64 a-posteriori certificate (the ``f32`` route).

torch computes a CPU float32 SVD with its LAPACK's ``sgesdd`` (MKL in the x86 wheels: MKL's
AVX-512 kernels on Intel, AVX2 on AMD), roughly twice as fast per flop as float64 where AVX-512
is wide. Whether its σ keep deltaspec's promise — within ``PROMISE``·σ₁ of float64 LAPACK — is
decided afterwards, in float64, from the returned triplets (U, s, V):

    |σᵢ(ΔW) − sᵢ| ≤ ‖ΔW − U·diag(s)·Vᵀ‖₂ + |σᵢ(U·diag(s)·Vᵀ) − sᵢ|        (Weyl)
    σᵢ(U·diag(s)·Vᵀ) / sᵢ ∈ [√((1 − δ_U)(1 − δ_V)), √((1 + δ_U)(1 + δ_V))]  (Ostrowski)

with δ_U = ‖UᵀU − I‖₂ (and δ_V alike), each 2-norm bounded by its Frobenius norm. Every term is
computed in float64 from ΔW as stored (ΔW = tuned − base in float64 blocks, never the float32
copy), so the bound is rigorous up to the certificate's own float64 rounding, which is added
(``SLACK``·σ₁). Where the bound exceeds the promise the values are refused and the caller takes
the exact float64 route: the float32 speed is used only where it is shown harmless. The checks
run cheapest first and stop at the first that already breaks the promise.

What it costs and gains is measured, never assumed (``deltaspec calibrate``, the benchmark):
float32 vectors are orthonormal only to ~√n·ε₃₂, so at n = 4096 δ alone is ~1e-5 and the
certificate fails; the route can pay only for small or very well conditioned problems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deltaspec.engine.kernels import F64, Operand

PROMISE = 1e-6  # σ within this·σ₁ of float64 LAPACK (DESIGN.md)
SLACK = 1e-12  # the certificate's own float64 rounding, relative to σ₁


@dataclass(frozen=True)
class Certified:
    """The float32 σ (descending, float64 dtype) when certified, else None; ``bound`` is the
    certified |σ − σ_exact| / σ₁ (inf where a check stopped early), ``failed`` what failed."""

    values: torch.Tensor | None
    bound: float
    failed: str = ""


def orthogonality(q: torch.Tensor) -> float:
    """‖QᵀQ − I‖_F in float64 (a bound on ‖QᵀQ − I‖₂).

    >>> orthogonality(torch.eye(3, 2))
    0.0
    """
    q64 = q.to(F64)
    gram = q64.T @ q64
    gram.diagonal().sub_(1.0)
    return float(torch.linalg.matrix_norm(gram))


def scale_bound(du: float, dv: float) -> float:
    """The largest relative change of sᵢ that non-orthonormal U and V (δ_U, δ_V) can cause.

    >>> scale_bound(0.0, 0.0), round(scale_bound(1e-6, 1e-6), 12)
    (0.0, 1e-06)
    """
    if du >= 1 or dv >= 1:
        return math.inf
    return max(math.sqrt((1 + du) * (1 + dv)) - 1, 1 - math.sqrt((1 - du) * (1 - dv)))


def residual(op: Operand, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    """‖ΔW − U·diag(s)·Vᵀ‖_F in float64, ΔW read in row blocks as stored."""
    v64 = vh.to(F64)
    us = u.to(F64) * s.to(F64)
    total, step = 0.0, op.step(True)
    for lo in range(0, op.shape[0], step):
        hi = min(lo + step, op.shape[0])
        blk = op.rows(lo, hi)
        blk.sub_(us[lo:hi] @ v64)
        total += float(blk.square().sum())
    return math.sqrt(total)


def float32_matrix(op: Operand) -> torch.Tensor:
    """ΔW rounded to float32 (formed in float64 blocks, so tuned − base is rounded once)."""
    out = torch.empty(op.shape, dtype=torch.float32, device=op.device)
    step = op.step(True)
    for lo in range(0, op.shape[0], step):
        hi = min(lo + step, op.shape[0])
        out[lo:hi].copy_(op.rows(lo, hi))
    return out


def certified(op: Operand, promise: float = PROMISE) -> Certified:
    """σ of ``op`` from float32 ``gesdd`` where a float64 certificate shows them within
    ``promise``·σ₁ of the exact ones (see the module's docstring), else ``values=None``.

    >>> m = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> res = certified(Operand((2, 2), torch.device("cpu"), "m", dense=[(1.0, m)]))
    >>> res.values.tolist(), res.bound < 1e-6
    ([3.0, 1.0], True)
    """
    u, s, vh = torch.linalg.svd(float32_matrix(op), full_matrices=False)
    top = float(s[0]) if s.numel() else 0.0
    if top == 0.0:
        return Certified(None, math.inf, "zero matrix")
    limit = promise * top
    dv = orthogonality(vh.T)
    if top * scale_bound(0.0, dv) > limit:
        return Certified(None, math.inf, f"‖VᵀV − I‖ = {dv:.1e}")
    du = orthogonality(u)
    spread = top * scale_bound(du, dv)
    if spread > limit:
        return Certified(None, math.inf, f"‖UᵀU − I‖ = {du:.1e}, ‖VᵀV − I‖ = {dv:.1e}")
    bound = residual(op, u, s, vh) + spread + SLACK * top
    if bound > limit:
        return Certified(None, bound / top, f"bound {bound / top:.1e}·σ₁")
    return Certified(s.to("cpu", F64), bound / top)


__all__ = ["PROMISE", "Certified", "certified", "float32_matrix", "orthogonality", "residual",
           "scale_bound"]
