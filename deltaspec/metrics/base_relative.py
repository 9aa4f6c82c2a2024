r"""Metrics of an update ΔW against its base weight W (same (out, in) orientation).

Each takes the reduced quantities it needs, not W itself: the engine forms them blockwise on the
device (:mod:`deltaspec.engine.relative`, :meth:`~deltaspec.engine.kernels.Operand.fro2`), so a
large W is never copied to float64 whole. These are the functions :func:`deltaspec.analyze` calls.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the functions that take tensors: the metric table (and so the
    import torch  # torch-free CLI route) imports this module without torch


def relative_norm(delta_fro: float, base_fro: float) -> float:
    r""":math:`\|\Delta W\|_F / \|W\|_F` from the two Frobenius norms (NaN for a zero base).

    >>> import torch
    >>> w, dw = torch.full((2, 2), 5.0), torch.tensor([[0.0, 3.0], [4.0, 0.0]])
    >>> relative_norm(float(torch.linalg.matrix_norm(dw)), float(torch.linalg.matrix_norm(w)))
    0.5
    >>> relative_norm(1.0, 0.0)
    nan
    """
    return delta_fro / base_fro if base_fro > 0 else math.nan


def amplification(delta_fro: float, projection: torch.Tensor) -> float:
    r"""Amplification factor :math:`\|\Delta W\|_F / \|U_r^\top W V_r\|_F` (Hu et al. 2021, §7.3)
    from ‖ΔW‖_F and the r×r ``projection`` :math:`U_r^\top W V_r`, with U_r, V_r the top-r
    singular vectors of ΔW. NaN when r = 0 or the projection is zero.

    >>> import torch
    >>> w = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> dw = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # rank 1, along e₁
    >>> u, s, vh = torch.linalg.svd(dw)
    >>> amplification(float(s.square().sum().sqrt()), u[:, :1].T @ w @ vh[:1].T)
    0.5
    >>> amplification(2.0, torch.zeros(0, 0))
    nan
    """
    import torch

    pn = float(torch.linalg.matrix_norm(projection.to(torch.float64))) if projection.numel() else 0.0
    return delta_fro / pn if pn > 0 else math.nan


def intruders(cosines: torch.Tensor, threshold: float = 0.5) -> int:
    r"""Intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228) from the matrix
    ``cosines`` of :math:`|\cos(u^W_j, u_i)|` — rows: every left singular vector of W, columns:
    the top (usually 10) left singular vectors of W + ΔW. Counts the columns whose largest
    entry is below :math:`\tau` = ``threshold``: tuned directions close to none of W's.

    >>> import torch
    >>> w = torch.diag(torch.arange(5.0, 0.0, -1.0, dtype=torch.float64))
    >>> v = torch.ones(5, 1, dtype=torch.float64) / 5 ** 0.5  # a direction off every axis of W
    >>> u_w, u_t = torch.linalg.svd(w)[0], torch.linalg.svd(w + 20 * v @ v.T)[0][:, :2]
    >>> cos = (u_w.T @ u_t).abs()
    >>> cos.max(dim=0).values.round(decimals=2).tolist()
    [0.49, 0.83]
    >>> intruders(cos), intruders(cos, threshold=0.9)
    (1, 2)
    """
    if cosines.numel() == 0:
        return 0
    return int((cosines.abs().max(dim=0).values < threshold).sum())
