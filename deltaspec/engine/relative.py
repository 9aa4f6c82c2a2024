"""Engine kernels that involve a second matrix: another update (cosine) or the base weight W
(the intruder count). Operands are read in float64 blocks on their device, like the rest of
:mod:`deltaspec.engine.kernels`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaspec.engine.dense import VECTOR_RTOL, svd_fallback, top_eigenpairs
from deltaspec.engine.kernels import F64, Operand, eigh_desc, gram, lapack_threads
from deltaspec.engine.subspace import top_eigvecs


def frobenius_inner(a: Operand, b: Operand) -> float:
    """⟨ΔW_a, ΔW_b⟩_F in float64, read blockwise (operands may be dense on a device); a pair of
    single factored terms never forms B·A: ⟨B₁A₁, B₂A₂⟩ = Σ (B₁ᵀB₂) ⊙ (A₁A₂ᵀ). The input of
    :func:`deltaspec.metrics.cosine`."""
    if not a.dense and not b.dense and len(a.factored) == len(b.factored) == 1:
        (b1, a1), (b2, a2) = a.factored[0], b.factored[0]
        inner = float(((b1.to(F64).T @ b2.to(F64)) * (a1.to(F64) @ a2.to(F64).T)).sum())
    else:
        inner, s = 0.0, a.step(True) // 2 + 1
        for lo in range(0, a.shape[0], s):
            hi = min(lo + s, a.shape[0])
            inner += float((a.rows(lo, hi) * b.rows(lo, hi).to(a.device)).sum())
    return inner


def projection(w: Operand, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The r×r projection Uᵀ·W·V (float64, on the CPU) of W onto ΔW's top-r singular vectors
    ``u`` (out, r) and ``v`` (in, r), W read blockwise: the input of
    :func:`deltaspec.metrics.amplification`."""
    return u.to("cpu", F64).T @ w.mm(v).to("cpu", F64)


@dataclass
class BaseEig:
    """W's float64 Gram eigenpairs and orientation: the costly part of the intruder count,
    computed once per base matrix and reused for every update of it. ``s`` and ``vec`` are in
    LAPACK's ascending order (``vec`` is n² floats: flipping it would copy it)."""

    s: torch.Tensor  # singular values of W, ascending
    vec: torch.Tensor  # eigenvectors of the Gram: right vectors of W when tall, left ones when wide
    tall: bool

    def top(self, t: int) -> torch.Tensor:
        """The eigenvectors of the t largest eigenvalues, descending (a copy of t columns)."""
        return self.vec[:, self.vec.shape[1] - min(t, self.vec.shape[1]):].flip(1)


def base_eig(w: Operand) -> BaseEig:
    """Eigen-decompose W's Gram matrix (see :class:`BaseEig`). Peak memory: the Gram, the
    vectors and syevd's 2n² workspace; the Gram is freed before this returns."""
    gw, tall = gram(w)
    if gw.is_cuda:
        lam, vec = eigh_desc(gw)
        return BaseEig(lam.flip(0).clamp_min(0).sqrt(), vec.flip(1), tall)
    with lapack_threads():
        lam, vec = torch.linalg.eigh(gw)
    del gw
    return BaseEig(lam.clamp_min(0).sqrt(), vec, tall)


def same_matrix(a: Operand, b: Operand) -> bool:
    """True when two single-term dense operands hold the same matrix (two sides' base weights)."""
    if a is b:
        return True
    if a.shape != b.shape or a.factored or b.factored or len(a.dense) != 1 or len(b.dense) != 1:
        return False
    (ca, ta), (cb, tb) = a.dense[0], b.dense[0]
    return ca == cb and ta.dtype == tb.dtype and torch.equal(ta, tb.to(ta.device))


class BaseEigs:
    """:class:`BaseEig` of the last ``keep`` base matrices, so that the two sides of a compare
    share W's (modules come in order: older ones are dropped, memory stays flat)."""

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._known: list[tuple[Operand, BaseEig]] = []

    def of(self, w: Operand) -> BaseEig:
        """W's decomposition, computed on first use."""
        for known, eig in self._known:
            if same_matrix(known, w):
                return eig
        eig = base_eig(w)
        self._known = [*self._known[-(self.keep - 1):], (w, eig)] if self.keep > 1 else [(w, eig)]
        return eig


def intruder_cosines(w: Operand, tuned: Operand, top: int,
                     hint: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
                     eig: BaseEig | None = None) -> torch.Tensor:
    """|cos| between every left singular vector of W (rows) and the top-``top`` left singular
    vectors of W + ΔW (columns) — the input of the intruder count (Shuttleworth et al. 2024).

    U_W comes from ``eigh`` of W's float64 Gram (for a tall W, U_Wᵀu = Σ⁻¹V_Wᵀ(Wᵀu), so U_W is
    never formed), or from ``eig`` when W's was computed already; the top vectors of W + ΔW come
    from subspace iteration on its Gram, started from W's top vectors and ``hint`` = ΔW's top
    (U, V), with ``eigh`` as the fallback.
    """
    eig = eig if eig is not None else base_eig(w)
    s, vec, tall = eig.s, eig.vec, eig.tall
    t = min(top, min(w.shape))
    start = [eig.top(t + 8)]  # the Gram's side: right vectors when tall, left ones when wide
    side = hint[1] if tall else hint[0]
    if side is not None and side.shape[1]:
        start.append(side.to(vec.device, F64))
    theta, x = _tuned_top(tuned, t, torch.cat(start, dim=1))
    floor = float(theta[0]) * VECTOR_RTOL**2 if theta.numel() else 0.0
    keep = theta > floor
    theta, x = theta[keep], x[:, keep]
    u_t = tuned.mm(x) / theta.sqrt().to(tuned.device) if tall else x  # (m, t) left vectors of W+ΔW
    if not tall:
        return (vec.T @ u_t.to(vec.device)).abs()
    if float(s.min()) <= float(s.max()) * VECTOR_RTOL:
        u_w = svd_fallback(w, min(w.shape)).U
        assert u_w is not None
        return (u_w.T @ u_t.to(u_w.device)).abs()
    return ((vec.T @ w.rmm(u_t).to(vec.device)) / s[:, None]).abs()


def _tuned_top(tuned: Operand, t: int, start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-t eigenpairs of the Gram matrix of W + ΔW (same orientation as W's)."""
    g, _ = gram(tuned)
    q = min(g.shape[0], start.shape[1] + 8)
    got = top_eigvecs(g, t, q, max_iters=64, start=start) if q < g.shape[0] else None
    if got is None:  # one reduction for the values and the t vectors (solvers' policy)
        lam, vec, _ = top_eigenpairs(g, t)
        return lam[:t], vec
    return got
