r"""Metrics between two updates of the same module: subspace similarity, principal angles, cosine.

Singular-vector matrices have orthonormal columns, sorted by descending σ. When either side has
no vectors (a zero update), similarity is undefined and these functions return NaN.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the functions that take tensors: the metric table (and so the
    import torch  # torch-free CLI route) imports this module without torch


def subspace_similarity_grid(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    r"""The grid :math:`\varphi(i, j) = \|U_a[:, :i]^\top U_b[:, :j]\|_F^2 / \min(i, j)`
    for i = 1..k_a, j = 1..k_b (Hu et al. 2021, §7). Returned as a (k_a, k_b) float64 tensor.

    >>> import torch
    >>> eye = torch.eye(4, dtype=torch.float64)
    >>> subspace_similarity_grid(eye[:, :2], eye[:, [1, 0]]).tolist()
    [[0.0, 1.0], [1.0, 1.0]]
    """
    import torch

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
    import torch

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
    import torch

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


def cosine(inner: float, fro_a: float, fro_b: float) -> float:
    r"""Cosine :math:`\langle \Delta W_a, \Delta W_b\rangle_F / (\|\Delta W_a\|_F \|\Delta W_b\|_F)`
    from the Frobenius inner product and the two norms (the engine reduces ΔW_a, ΔW_b to these
    blockwise: :func:`deltaspec.engine.relative.frobenius_inner`); NaN when either norm is zero.

    >>> import torch
    >>> a, b = torch.eye(2, dtype=torch.float64), torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    >>> round(cosine(float((a * b).sum()), float(a.norm()), float(b.norm())), 6)  # 4 / (√2 · 3)
    0.942809
    >>> cosine(0.0, 0.0, 1.0)
    nan
    """
    if fro_a <= 0 or fro_b <= 0:
        return math.nan
    return max(-1.0, min(1.0, inner / (fro_a * fro_b)))
