"""Engine kernels that involve a second matrix: another update (cosine) or the base weight W
(the intruder count). Operands are read in float64 blocks on their device, like the rest of
:mod:`deltaspec.engine.kernels`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaspec.engine import solvers, tridiag
from deltaspec.engine.dense import VECTOR_RTOL, blas_threads_for, svd_fallback, top_eigenpairs
from deltaspec.engine.kernels import F64, Operand, eigh_desc, gram, lapack_threads
from deltaspec.engine.subspace import plan_block, top_eigvecs


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
    """W's float64 Gram eigen-decomposition and orientation: the costly part of the intruder
    count, computed once per base matrix and reused for every update of it.

    Either ``vec`` — every eigenvector, from one ``eigh`` (CUDA, or a CPU policy other than
    ``tridiag``; LAPACK's ascending order: flipping n² floats would copy them) — or ``red``, the
    CPU's one tridiagonal reduction G = Q·T·Qᵀ, whose eigenvectors are used only as Vᵀy =
    Zᵀ(Qᵀy) (:meth:`project`): T's eigenvectors Z come from divide and conquer on first use,
    and the O(n³) back-transform that ``eigh`` spends on all n vectors is never done.
    """

    s: torch.Tensor  # singular values of W, ascending
    tall: bool  # the Gram's side: right vectors of W when tall, left ones when wide
    vec: torch.Tensor | None = None
    red: tridiag.Reduced | None = None

    def top(self, t: int) -> torch.Tensor:
        """The eigenvectors of the t largest eigenvalues, descending (n, t)."""
        if self.red is not None:
            return torch.from_numpy(self.red.top(t))
        assert self.vec is not None
        return self.vec[:, self.vec.shape[1] - min(t, self.vec.shape[1]):].flip(1)

    def project(self, y: torch.Tensor) -> torch.Tensor:
        """Vᵀ·y for every eigenvector (rows in the ascending order of ``s``)."""
        if self.red is not None:
            with lapack_threads():
                return torch.from_numpy(self.red.project(y.to("cpu", F64).numpy()))
        assert self.vec is not None
        return self.vec.T @ y.to(self.vec.device, F64)


def base_eig(w: Operand) -> BaseEig:
    """Eigen-decompose W's Gram matrix (see :class:`BaseEig`): on the CPU always by the one
    reduction, whose peak is the Gram's own storage, then T's n² eigenvectors and dstevd's n²
    workspace on first :meth:`BaseEig.project` (3n² doubles), whichever LAPACK; ``eigh`` (CUDA)
    takes the Gram, the vectors and syevd's 2n² workspace (4n²), which MKL's CPU ``syevd`` would
    also keep in its own buffers."""
    gw, tall = gram(w)
    if gw.is_cuda:
        lam, vec = eigh_desc(gw)
        return BaseEig(lam.flip(0).clamp_min(0).sqrt(), tall, vec=vec.flip(1))
    pol = solvers.policy(gw.shape[0], gw.device.type)
    if gw.shape[0] >= 2:  # whatever the top-k route: the reduction's memory is bounded (see above)
        with lapack_threads():
            red = tridiag.Reduced.of(gw, threads=blas_threads_for(pol))
        del gw
        return BaseEig(torch.from_numpy(red.ascending()).clamp_min(0).sqrt(), tall, red=red)
    with lapack_threads():
        lam, vec = torch.linalg.eigh(gw)
    del gw
    return BaseEig(lam.clamp_min(0).sqrt(), tall, vec=vec)


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
                     eig: BaseEig | None = None, shift: float | None = None) -> torch.Tensor:
    """|cos| between every left singular vector of W (rows) and the top-``top`` left singular
    vectors of W + ΔW (columns) — the input of the intruder count (Shuttleworth et al. 2024).

    U_W comes from W's float64 Gram (:func:`base_eig`; for a tall W, U_Wᵀu = Σ⁻¹V_Wᵀ(Wᵀu), so
    U_W is never formed), or from ``eig`` when W's was computed already; the top vectors of W + ΔW come
    from subspace iteration on its Gram, started from W's top vectors and ``hint`` = ΔW's top
    (U, V), with one reduction as the fallback. ``shift`` = ‖ΔW‖₂, when known, bounds how far
    the spectrum of W + ΔW is from W's (Weyl: |σᵢ(W + ΔW) − σᵢ(W)| ≤ ‖ΔW‖₂): where even the
    bound's gap leaves the iteration too slow to pay (a flat spectrum), it is not tried.
    """
    eig = eig if eig is not None else base_eig(w)
    s, tall = eig.s, eig.tall
    t = min(top, min(w.shape))
    start = [eig.top(t + 8)]  # the Gram's side: right vectors when tall, left ones when wide
    side = hint[1] if tall else hint[0]
    if side is not None and side.shape[1]:
        start.append(side.to(start[0].device, F64))
    theta, x = _tuned_top(tuned, t, torch.cat(start, dim=1), _may_iterate(eig.s, t, shift))
    floor = float(theta[0]) * VECTOR_RTOL**2 if theta.numel() else 0.0
    keep = theta > floor
    theta, x = theta[keep], x[:, keep]
    u_t = tuned.mm(x) / theta.sqrt().to(tuned.device) if tall else x  # (m, t) left vectors of W+ΔW
    if not tall:
        return eig.project(u_t).abs()
    if float(s.min()) <= float(s.max()) * VECTOR_RTOL:
        u_w = svd_fallback(w, min(w.shape)).U
        assert u_w is not None
        return (u_w.T @ u_t.to(u_w.device)).abs()
    proj = eig.project(w.rmm(u_t))
    return (proj / s[:, None].to(proj.device)).abs()


def _may_iterate(s: torch.Tensor, t: int, shift: float | None) -> bool:
    """Whether subspace iteration for the top-t vectors of W + ΔW can pay, judged from W's
    singular values ``s`` (ascending) moved by at most ``shift`` = ‖ΔW‖₂ toward each other
    (Weyl): the pessimistic λ_t and λ_{q+1} plan the iteration as for a known spectrum.

    >>> s = torch.cat([torch.ones(198, dtype=torch.float64), torch.tensor([10.0, 100.0])])
    >>> _may_iterate(s, 2, 0.1), _may_iterate(s, 2, 9.0), _may_iterate(torch.ones(200), 2, 0.1)
    (True, False, False)
    """
    if shift is None:
        return True
    desc = s.flip(0).to("cpu", F64)
    low = (desc[:t] - shift).clamp_min(0).square()
    high = (desc[t:] + shift).square()
    return plan_block(torch.cat([low, high]), t, max(1, s.numel() // 2)) is not None


def _tuned_top(tuned: Operand, t: int, start: torch.Tensor,
               iterate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-t eigenpairs of the Gram matrix of W + ΔW (same orientation as W's)."""
    g, _ = gram(tuned)
    q = min(g.shape[0], start.shape[1] + 8)
    got = top_eigvecs(g, t, q, max_iters=64, start=start) if iterate and q < g.shape[0] else None
    if got is None:  # one reduction for the values and the t vectors (CPU: in g's memory)
        pol = solvers.policy(g.shape[0], g.device.type)
        if g.device.type == "cpu":  # never a full eigh beside W's decomposition: bounded memory
            pol = solvers.Policy(pol.values, "tridiag", "tridiag", pol.source, pol.blas_threads)
        lam, vec, _ = top_eigenpairs(g, t, pol)
        return lam[:t], vec
    return got
