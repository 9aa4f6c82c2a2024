"""The Kronecker kernel of the spectral engine: exact σ (and vectors) of W₁ ⊗ W₂ from its factors.

σ(W₁ ⊗ W₂) = {σᵢ(W₁)·σⱼ(W₂)} and the singular vectors are the Kronecker products of the
factors' (Van Loan, "The ubiquitous Kronecker product", 2000), so the update is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

F64 = torch.float64


@dataclass
class KronResult:
    """σ of W₁ ⊗ W₂ (descending, all products σᵢ(W₁)·σⱼ(W₂)) and the top vectors."""

    values: torch.Tensor
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None


def _factor_svd(f: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Thin float64 SVD (U, σ, V) of a Kronecker factor: a matrix, or B·A through QR of B and Aᵀ."""
    if isinstance(f, tuple):
        qb, rb = torch.linalg.qr(f[0].to(F64))
        qa, ra = torch.linalg.qr(f[1].to(F64).T)
        uc, s, vch = torch.linalg.svd(rb @ ra.T)
        return qb @ uc, s, qa @ vch.T
    u, s, vh = torch.linalg.svd(f.to(F64), full_matrices=False)
    return u, s, vh.T


def kron_solve(w1: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
               w2: torch.Tensor | tuple[torch.Tensor, torch.Tensor], vectors_k: int) -> KronResult:
    """Exact σ of W₁ ⊗ W₂: the pairwise products of the factors' σ (each factor by a float64 SVD,
    or QR + SVD of its core when it is B·A); the top ``vectors_k`` vectors (-1: all) are the
    Kronecker products u₁ᵢ ⊗ u₂ⱼ, v₁ᵢ ⊗ v₂ⱼ of the pairs giving the top σ. ΔW is never formed."""
    u1, s1, v1 = _factor_svd(w1)
    u2, s2, v2 = _factor_svd(w2)
    prod = torch.outer(s1, s2).reshape(-1)
    values, order = torch.sort(prod, descending=True, stable=True)
    if not vectors_k:
        return KronResult(values)
    kk = values.numel() if vectors_k < 0 else min(vectors_k, values.numel())
    i, j = order[:kk] // s2.numel(), order[:kk] % s2.numel()
    u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(-1, kk)  # column t: u1ᵢ ⊗ u2ⱼ
    v = (v1[:, i][:, None, :] * v2[:, j][None, :, :]).reshape(-1, kk)
    return KronResult(values, u, v)
