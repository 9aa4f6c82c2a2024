r"""Metrics of an update ΔW against its base weight W (same (out, in) orientation)."""

from __future__ import annotations

import math

import torch


def relative_norm(delta_fro: float, base: torch.Tensor) -> float:
    r""":math:`\|\Delta W\|_F / \|W\|_F` (NaN for a zero base).

    >>> import torch
    >>> relative_norm(1.0, torch.full((2, 2), 1.0))
    0.5
    """
    wn = float(torch.linalg.matrix_norm(base.to(torch.float64)))
    return delta_fro / wn if wn > 0 else math.nan


def amplification(delta_fro: float, base: torch.Tensor, u_r: torch.Tensor,
                  v_r: torch.Tensor) -> float:
    r"""Amplification factor :math:`\|\Delta W\|_F / \|U_r^\top W V_r\|_F` (Hu et al. 2021, §7.3),
    U_r, V_r the top-r singular vectors of ΔW. NaN when there are none or the projection is 0.

    >>> import torch
    >>> w = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> e1 = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    >>> amplification(2.0, w, e1, e1)
    0.5
    """
    if u_r.shape[1] == 0:
        return math.nan
    proj = u_r.to(torch.float64).T @ base.to(torch.float64) @ v_r.to(torch.float64)  # (r, r)
    pn = float(torch.linalg.matrix_norm(proj))
    return delta_fro / pn if pn > 0 else math.nan


def intruders(u_base: torch.Tensor, u_tuned_top: torch.Tensor, threshold: float = 0.5) -> int:
    r"""Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): how many of the top
    left singular vectors of W + ΔW (``u_tuned_top``, usually 10) have
    :math:`\max_j |\cos(u_i, u_j^{W})| < \tau` against every left singular vector of W.

    >>> import torch
    >>> eye = torch.eye(3, dtype=torch.float64)
    >>> intruders(eye[:, :2], eye[:, 1:])
    1
    """
    if u_tuned_top.shape[1] == 0:
        return 0
    cos = (u_base.to(torch.float64).T @ u_tuned_top.to(torch.float64)).abs()  # (k_W, t)
    return int((cos.max(dim=0).values < threshold).sum())
