"""Dense solves: all singular values of an operand and, when asked, its top-k singular vectors,
through the route that :mod:`deltaspec.engine.solvers` chose for this machine.

- values: the float64 Gram matrix of the smaller side and a symmetric eigensolver (``evd``:
  syevd; ``tridiag``: dsytrd + dsterf), or a float64 bidiagonal SVD of the matrix (``svd``);
- values + top-k vectors (k ≤ min(m, n)/4): one tridiagonal reduction gives both (``tridiag``,
  route ``gram+tridiag``), or one ``eigh`` (``gram``), or the values and then subspace iteration
  when it converges fast (``gram+randomized``) with a second reduction as fallback;
- many vectors: one ``eigh`` of the Gram;
- values by float32 ``gesdd`` where a float64 certificate shows them within 1e-6·σ₁ (``f32``,
  :mod:`deltaspec.engine.lowprec`), else the Gram route;
- a float64 SVD (``svd``) where a wanted σ is below ``VECTOR_RTOL``·σ₁ (U = M·V/σ would be
  inaccurate there).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltaspec.engine import lowprec, solvers, tridiag
from deltaspec.engine.kernels import (
    TINY_GRAM,
    Operand,
    eigh_desc,
    eigvalsh_desc,
    gram,
    lapack_threads,
)
from deltaspec.engine.subspace import plan_block, top_eigvecs

VECTOR_RTOL = 1e-5  # σ_k ≤ this·σ₁ makes U = M·V/σ inaccurate: such vectors come from an SVD
Pairs = tuple[torch.Tensor, torch.Tensor, str]  # (all eigenvalues, top-k eigenvectors, route)


@dataclass
class DenseResult:
    """σ (descending, length min(m, n), on the device) and the top vectors, with the route."""

    values: torch.Tensor
    route: str
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None


def policy_for(op: Operand) -> solvers.Policy:
    """The solver policy for ``op``'s Gram size on ``op``'s device."""
    return solvers.policy(min(op.shape), op.device.type)


def wants_gram(op: Operand) -> bool:
    """False when values-only solves of ``op`` skip the Gram matrix (``svd``, ``f32``)."""
    return policy_for(op).values not in NO_GRAM


NO_GRAM = ("svd", "f32")  # values routes that work on the matrix itself


def blas_threads_for(pol: solvers.Policy) -> int:
    """OpenBLAS threads for a ``tridiag`` call (inside :func:`lapack_threads`)."""
    return torch.get_num_threads() if pol.blas_threads == 0 else 1


def _tridiag_values(g: torch.Tensor, pol: solvers.Policy) -> torch.Tensor:
    with lapack_threads():
        return tridiag.eigvals(g, overwrite=True, threads=blas_threads_for(pol))


def _evd_values(g: torch.Tensor, pol: solvers.Policy) -> torch.Tensor:
    return eigvalsh_desc(g)


GRAM_VALUES: dict[str, Callable[[torch.Tensor, solvers.Policy], torch.Tensor]] = {
    "evd": _evd_values, "tridiag": _tridiag_values, "svd": _evd_values,  # svd, f32: Gram given
    "f32": _evd_values,
}


def _one_tridiag(g: torch.Tensor, k: int, pol: solvers.Policy) -> Pairs:
    with lapack_threads():
        lam, vec = tridiag.eig_top(g, k, overwrite=True, threads=blas_threads_for(pol))
    return lam.to(g.device), vec.to(g.device), "gram+tridiag"


def _one_eigh(g: torch.Tensor, k: int, pol: solvers.Policy) -> Pairs:
    lam, vec = eigh_desc(g)
    return lam, vec[:, :k], "gram"


def _values_then_subspace(g: torch.Tensor, k: int, pol: solvers.Policy) -> Pairs:
    lam = eigvalsh_desc(g)
    plan = plan_block(lam, k, g.shape[0] // 2)
    got = top_eigvecs(g, k, plan[0], plan[1] + 8, lam=lam) if plan else None
    if got is not None:
        return lam, got[1], "gram+randomized"
    second = _one_tridiag if pol.fallback == "tridiag" and g.device.type == "cpu" else _one_eigh
    return (lam, *second(g, k, pol)[1:])


TOP_VECTORS: dict[str, Callable[[torch.Tensor, int, solvers.Policy], Pairs]] = {
    "tridiag": _one_tridiag, "eigh": _one_eigh, "evd": _values_then_subspace,
}


def top_eigenpairs(g: torch.Tensor, k: int, pol: solvers.Policy | None = None) -> Pairs:
    """All eigenvalues (descending) of the symmetric PSD ``g`` and its top-k eigenvectors, by the
    policy's vector route (one eigh for more than a quarter of them). ``g`` may be overwritten."""
    pol = pol or solvers.policy(g.shape[0], g.device.type)
    route = pol.vectors if k * 4 <= g.shape[0] else "eigh"
    if route == "tridiag" and g.device.type != "cpu":
        route = "eigh"
    return TOP_VECTORS[route](g, k, pol)


def dense_solve(op: Operand, vectors_k: int,
                pre: tuple[torch.Tensor, bool] | None = None) -> DenseResult:
    """All singular values of ``op`` and, for ``vectors_k`` ≠ 0, the top ``vectors_k`` vectors
    (-1: all), see the module's docstring. ``pre``: the Gram matrix already computed (by the
    pipeline's worker); it is consumed."""
    pol = policy_for(op)
    kmin = min(op.shape)
    kk = kmin if vectors_k < 0 else min(vectors_k, kmin)
    if not kk and pre is None and pol.values == "svd":
        return DenseResult(torch.linalg.svdvals(op.rows(0, op.shape[0])), "svd")
    fallback = not kk and pre is None and pol.values == "f32" and op.device.type == "cpu"
    if fallback:
        got = lowprec.certified(op)
        if got.values is not None:
            return DenseResult(got.values, "f32+certified")
    g, tall = pre if pre is not None else gram(op)
    if fallback and float(g.diagonal().max()) < TINY_GRAM:  # underflowed: LAPACK scales itself
        return DenseResult(torch.linalg.svdvals(op.rows(0, op.shape[0])), "svd")
    if not kk:
        t0 = time.perf_counter()
        lam = GRAM_VALUES[pol.values](g, pol)
        solvers.observe(pol, g.shape[0], time.perf_counter() - t0)
        return DenseResult(lam.clamp_min(0).sqrt(), "gram")
    lam, w, route = top_eigenpairs(g, kk, pol)
    del g
    s = lam.clamp_min(0).sqrt()
    if float(s[kk - 1]) <= float(s[0]) * VECTOR_RTOL:
        return svd_fallback(op, kk)
    other = op.mm(w) if tall else op.rmm(w)
    other = other / s[:kk].to(other.device)  # M·V/σ (or Mᵀ·U/σ)
    u, v = (other, w) if tall else (w, other)
    return DenseResult(s, route, u, v)


def svd_fallback(op: Operand, kk: int) -> DenseResult:
    """Float64 SVD (gesvd on CUDA), for vectors where the Gram route is ill-conditioned."""
    m64 = op.rows(0, op.shape[0])
    driver = "gesvd" if m64.is_cuda else None
    u, s, vh = torch.linalg.svd(m64, full_matrices=False, driver=driver)
    return DenseResult(s, "svd", u[:, :kk], vh[:kk].T)
