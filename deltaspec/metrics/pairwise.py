r"""Metrics between two updates of the same module: subspace similarity, principal angles, cosine.

Singular-vector matrices have orthonormal columns, sorted by descending σ. When either side has
no vectors (a zero update), similarity is undefined and these functions return NaN.
"""

from __future__ import annotations

import math

import torch

Factors = tuple[torch.Tensor, torch.Tensor]


def subspace_similarity_grid(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    r"""The grid :math:`\varphi(i, j) = \|U_a[:, :i]^\top U_b[:, :j]\|_F^2 / \min(i, j)`
    for i = 1..k_a, j = 1..k_b (Hu et al. 2021, §7). Returned as a (k_a, k_b) float64 tensor.

    >>> import torch
    >>> eye = torch.eye(4, dtype=torch.float64)
    >>> subspace_similarity_grid(eye[:, :2], eye[:, [1, 0]]).tolist()
    [[0.0, 1.0], [1.0, 1.0]]
    """
    c = (u_a.to(torch.float64).T @ u_b.to(torch.float64)).square()  # (k_a, k_b)
    cum = c.cumsum(0).cumsum(1)  # cum[i-1, j-1] = ‖U_a[:, :i]ᵀ U_b[:, :j]‖²_F
    i = torch.arange(1, c.shape[0] + 1, dtype=torch.float64).reshape(-1, 1)
    j = torch.arange(1, c.shape[1] + 1, dtype=torch.float64).reshape(1, -1)
    return cum / torch.minimum(i, j)


def subspace_similarity(u_a: torch.Tensor, u_b: torch.Tensor, k: int | None = None) -> float:
    r""":math:`\varphi(k, k)`: 1 when the top-k subspaces coincide, ≈ k/d for random ones;
    NaN when either side has no vectors. k defaults to the smaller number of columns.

    >>> import torch
    >>> eye = torch.eye(4, dtype=torch.float64)
    >>> subspace_similarity(eye[:, :2], eye[:, 1:3])
    0.5
    """
    k = min(u_a.shape[1], u_b.shape[1]) if k is None else min(k, u_a.shape[1], u_b.shape[1])
    if k < 1:
        return math.nan
    c = u_a[:, :k].to(torch.float64).T @ u_b[:, :k].to(torch.float64)
    return float(c.square().sum() / k)


def principal_angles(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    r"""Principal angles (radians, ascending) between span(U_a) and span(U_b):
    :math:`\theta_i = \arccos \sigma_i(U_a^\top U_b)`.

    >>> import torch
    >>> eye = torch.eye(3, dtype=torch.float64)
    >>> [round(x, 4) for x in principal_angles(eye[:, :2], eye[:, 1:]).tolist()]
    [0.0, 1.5708]
    """
    if u_a.shape[1] == 0 or u_b.shape[1] == 0:
        return torch.zeros(0, dtype=torch.float64)
    cos = torch.linalg.svdvals(u_a.to(torch.float64).T @ u_b.to(torch.float64))
    return torch.arccos(cos.clamp(-1.0, 1.0))


def min_angle_degrees(u_a: torch.Tensor, u_b: torch.Tensor) -> float:
    """The smallest principal angle in degrees (0: the subspaces share a direction); NaN if empty.

    >>> import torch
    >>> eye = torch.eye(3, dtype=torch.float64)
    >>> min_angle_degrees(eye[:, :1], eye[:, 1:2])
    90.0
    """
    theta = principal_angles(u_a, u_b)
    return math.degrees(float(theta[0])) if theta.numel() else math.nan


def frobenius_inner(a: torch.Tensor | Factors, b: torch.Tensor | Factors) -> float:
    r""":math:`\langle \Delta W_a, \Delta W_b \rangle_F`, without forming factored products:
    :math:`\langle B_1A_1, B_2A_2\rangle = \sum (B_1^\top B_2) \odot (A_1 A_2^\top)`.

    >>> import torch
    >>> frobenius_inner(torch.ones(2, 2), (torch.ones(2, 1), torch.ones(1, 2)))
    4.0
    """
    f64 = lambda t: t.to(torch.float64)  # noqa: E731
    if isinstance(a, tuple) and isinstance(b, tuple):
        return float(((f64(a[0]).T @ f64(b[0])) * (f64(a[1]) @ f64(b[1]).T)).sum())
    if isinstance(a, tuple):
        a, b = b, a
    if isinstance(b, tuple):  # dense a, factored b: ⟨W, BA⟩ = Σ (Bᵀ W) ⊙ A
        return float(((f64(b[0]).T @ f64(a)) * f64(b[1])).sum())
    return float((f64(a) * f64(b)).sum())


def cosine(a: torch.Tensor | Factors, b: torch.Tensor | Factors) -> float:
    r"""Cosine :math:`\langle \Delta W_a, \Delta W_b\rangle_F / (\|\Delta W_a\|_F \|\Delta W_b\|_F)`;
    NaN when either is zero.

    >>> import torch
    >>> cosine(torch.eye(2), 2 * torch.eye(2))
    1.0
    """
    na, nb = frobenius_inner(a, a), frobenius_inner(b, b)
    if na <= 0 or nb <= 0:
        return math.nan
    return frobenius_inner(a, b) / math.sqrt(na * nb)
