"""Top-k eigenvectors of a PSD (Gram) matrix by subspace iteration: the randomised range finder
with power iterations, started from a seeded random block (or a given one), its length planned
from the exact eigenvalues when they are known, and its Ritz pairs checked by their residuals.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64
RESIDUAL_TOL = 1e-11  # Ritz residual ‖Gx − θx‖ ≤ tol·θ₁ accepts a top-k eigenvector
SEED = 0


def random_block(n: int, q: int, device: torch.device) -> torch.Tensor:
    """A seeded Gaussian (n, q) block, drawn on the CPU so every device starts from the same one."""
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(n, q, dtype=F64, generator=gen).to(device)


def iterations_needed(lam: torch.Tensor, k: int, q: int, tol: float = 1e-13) -> float:
    """Subspace iterations for the top-k eigenvectors of a PSD matrix with eigenvalues ``lam``
    (descending) with a block of q: the error shrinks by λ_{q+1}/λ_k per iteration."""
    if q >= lam.numel():
        return 1.0
    lk, lq = float(lam[k - 1]), float(lam[q])
    if lk <= 0 or lq >= lk:
        return math.inf
    return math.log(tol) / math.log(max(lq, 0.0) / lk) if lq > 0 else 1.0


def plan_block(lam: torch.Tensor, k: int, budget: int) -> tuple[int, int] | None:
    """(q, iterations) minimising q·iterations for the top-k eigenvectors, or None when every
    choice costs more than ``budget`` block-columns (then the exact ``eigh`` is cheaper)."""
    n = lam.numel()
    best: tuple[int, int] | None = None
    for q in sorted({min(n, k + extra) for extra in (8, 16, 32, 64, 128)}):
        its = iterations_needed(lam, k, q)
        if math.isfinite(its) and q * its <= budget and (best is None or q * its < best[0] * best[1]):
            best = (q, max(2, math.ceil(its)))
    return best


def top_eigvecs(g: torch.Tensor, k: int, q: int, max_iters: int,
                start: torch.Tensor | None = None,
                lam: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k eigenpairs (descending) of the PSD ``g`` by subspace iteration on a q-column block
    (``start`` columns first, random ones after), with Rayleigh–Ritz checks of the residuals.

    With the eigenvalues ``lam`` known, the first check waits for ¾ of the planned steps and the
    block is re-orthonormalised only as often as λ₁/λ_q requires (columns are rescaled in
    between): on a GPU the steps are then single matrix products.
    Returns None when the Ritz residuals are not below ``RESIDUAL_TOL``·θ₁ within ``max_iters``.
    """
    n = g.shape[0]
    cols = [] if start is None else [start.to(g.device, F64)[:, :q]]
    have = sum(c.shape[1] for c in cols)
    if have < q:
        cols.append(random_block(n, q - have, g.device))
    x, _ = torch.linalg.qr(torch.cat(cols, dim=1))
    first, every = 4, 1
    if lam is not None:
        first = max(4, (max_iters - 8) * 3 // 4)  # the plan (tolerance 1e-13) is conservative
        spread = float(lam[0]) / max(float(lam[min(q, lam.numel()) - 1]), 1e-300)
        every = max(1, int(math.log(1e6) / math.log(spread))) if spread > 1 else 1
    for it in range(1, max_iters + 1):
        z = g @ x
        if it >= first and (it - first) % 4 == 0 or it == max_iters:
            theta, s = torch.linalg.eigh(x.T @ z)
            theta, s = theta.flip(0), s.flip(1)
            ritz, gr = x @ s[:, :k], z @ s[:, :k]
            res = (gr - ritz * theta[:k]).norm(dim=0)
            scale = max(float(theta[0]), 0.0)
            if scale == 0.0 or float(res.max()) <= RESIDUAL_TOL * scale:
                return theta[:k], ritz
        nxt = it + 1
        if it % every == 0 or nxt >= first and (nxt - first) % 4 == 0 or nxt == max_iters:
            x, _ = torch.linalg.qr(z)  # orthonormal again (always before a check)
        else:
            x = z / z.norm(dim=0).clamp_min(1e-300)
    return None
