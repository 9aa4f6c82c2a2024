r"""Metrics of one spectrum σ₁ ≥ σ₂ ≥ … ≥ 0 (k = len(σ), usually min(m, n)).

Pure functions of a 1-D array: a tensor, a numpy array or a sequence of floats. They compute in
float64 numpy (a spectrum is short: numpy's per-call cost is a fraction of torch's, which made up
most of a 224-module adapter's metric time). An empty or all-zero spectrum gives 0 for every
metric here: no crash, no NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:  # torch is imported only where a tensor is passed (the torch-free CLI route)
    import torch

FLOAT32_EPS = float(np.finfo(np.float32).eps)
Values = Union["torch.Tensor", np.ndarray, Sequence[float]]  # a 1-D spectrum, any of these


def descending(values: Values) -> np.ndarray:
    """σ as a flat float64 numpy array, negatives clamped to 0, sorted descending (the form every
    metric here reads).

    >>> descending([1.0, 3.0, -1.0]).tolist()
    [3.0, 1.0, 0.0]
    """
    if hasattr(values, "detach"):  # a torch tensor of any float dtype, on any device
        import torch

        values = values.detach().to("cpu", torch.float64).numpy()
    s = np.maximum(np.asarray(values, dtype=np.float64).reshape(-1), 0.0)
    if s.size < 2 or bool((s[:-1] >= s[1:]).all()):  # already descending: an O(n) check, no sort
        return s
    return np.sort(s)[::-1]  # NaN first, as a descending torch sort puts it


def _scaled(values: Values) -> tuple[np.ndarray, float]:
    """(σ/c, c) with c the power of two just above σ₁ (0 for a zero spectrum): squares of σ/c
    neither underflow nor overflow where σ² would (σ ~ 1e-200), and dividing by a power of two
    is exact, so every metric reads the same bits as from σ itself."""
    s = descending(values)
    top = float(s[0]) if s.size else 0.0
    if not top > 0:
        return s[:0], 0.0
    c = math.ldexp(1.0, math.frexp(top)[1])
    return s / c, c


def _probs(values: Values, power: int) -> np.ndarray:
    s = _scaled(values)[0] ** power
    total = s.sum()
    return s / total if total > 0 else s[:0]


def _entropy_of(p: np.ndarray) -> float:
    p = p[p > 0]
    return max(float(-(p * np.log(p)).sum()), 0.0) + 0.0 if p.size else 0.0  # no -0.0


def fro_norm(values: Values) -> float:
    r"""Frobenius norm :math:`\sqrt{\sum_i \sigma_i^2}`.

    >>> fro_norm([3.0, 4.0])
    5.0
    """
    s, c = _scaled(values)
    return c * math.sqrt(float(np.dot(s, s)))


def spectral_norm(values: Values) -> float:
    r"""Spectral norm :math:`\sigma_1`.

    >>> spectral_norm([1.0, 3.0])
    3.0
    """
    s = descending(values)
    return float(s[0]) if s.size else 0.0


def nuclear_norm(values: Values) -> float:
    r"""Nuclear norm :math:`\sum_i \sigma_i`.

    >>> nuclear_norm([3.0, 1.0])
    4.0
    """
    return float(descending(values).sum())


def numerical_rank(values: Values, shape: tuple[int, int]) -> int:
    r"""Numerical rank :math:`\#\{\sigma_i > \sigma_1 \cdot \max(m, n) \cdot \varepsilon_{f32}\}`.

    >>> numerical_rank([1.0, 1e-3, 1e-9], (3, 3))
    2
    """
    s = descending(values)
    if not s.size or s[0] == 0:
        return 0
    return int((s > s[0] * max(shape) * FLOAT32_EPS).sum())


def entropy(values: Values) -> float:
    r"""Singular-value entropy :math:`H = -\sum_i p_i \ln p_i`, :math:`p_i = \sigma_i / \sum_j \sigma_j`.

    >>> round(entropy([1.0, 1.0]), 6) == round(math.log(2), 6)
    True
    """
    return _entropy_of(_probs(values, 1))


def effective_rank(values: Values) -> float:
    r"""Effective rank :math:`\exp(H)` (Roy & Vetterli 2007); 0 for a zero spectrum.

    >>> round(effective_rank([2.0, 2.0, 2.0, 0.0]), 6)
    3.0
    """
    p = _probs(values, 1)
    return math.exp(_entropy_of(p)) if p.size else 0.0


def normalized_entropy(values: Values, k: int | None = None) -> float:
    r"""Entropy divided by :math:`\ln k` (k = len(σ) unless given): 1 for a flat spectrum.

    >>> normalized_entropy([1.0, 1.0, 1.0, 1.0])
    1.0
    >>> normalized_entropy([1.0, 0.0, 0.0, 0.0])
    0.0
    """
    k = len(descending(values)) if k is None else k
    return entropy(values) / math.log(k) if k > 1 else 0.0


def energy_entropy(values: Values, k: int | None = None) -> float:
    r"""Entropy of the energy shares :math:`p_i = \sigma_i^2/\sum_j\sigma_j^2`, divided by ln k.

    >>> energy_entropy([1.0, 1.0])
    1.0
    """
    k = len(descending(values)) if k is None else k
    return _entropy_of(_probs(values, 2)) / math.log(k) if k > 1 else 0.0


def stable_rank(values: Values) -> float:
    r"""Stable rank :math:`\sum_i \sigma_i^2 / \sigma_1^2`.

    >>> stable_rank([2.0, 2.0, 0.0])
    2.0
    """
    s, _ = _scaled(values)
    return float(np.dot(s, s) / s[0] ** 2) if s.size else 0.0


def energy_rank(values: Values, tau: float) -> int:
    r"""Least r with :math:`\sum_{i \le r}\sigma_i^2 \ge \tau \sum_i \sigma_i^2`.

    >>> energy_rank([3.0, 1.0, 1.0], 0.9)
    2
    """
    p = _probs(values, 2)
    if not p.size:
        return 0
    cum = np.cumsum(p)
    # a tiny slack so that τ = 1 and exact ties are not lost to rounding
    return int((cum < tau - 1e-12).sum()) + 1


def top_share(values: Values, t: int) -> float:
    r"""Energy share of the top t values :math:`\sum_{i \le t}\sigma_i^2 / \sum_i \sigma_i^2`.

    >>> top_share([3.0, 1.0], 1)
    0.9
    """
    p = _probs(values, 2)
    return float(p[:t].sum()) if p.size else 0.0
