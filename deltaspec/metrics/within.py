r"""K-resolved, rank-matched metrics: what the top K singular values of an update look like
*among themselves*, for a K that no compared update's structural rank falls below.

A rank-r update has at most r non-zero singular values. Over all of its σ (normalised by
ln min(m, n)) its entropy is capped at ln r / ln min(m, n) whatever was learned, and its top-t
energy share is inflated by the same cap; between a rank-16 adapter and a full fine-tune those
quantities measure the rank, not the method. Taken within the top K with K ≤ every compared rank,
they compare like with like:

- ``entropy_top{K}``: :math:`H(\sigma_1..\sigma_K)/\ln K` with :math:`p_i=\sigma_i/\sum_{j\le K}\sigma_j`
  (K ≥ 2): 1 when the top K values are equal, 0 when σ₁ holds everything;
- ``share{t}_of_r``: :math:`\sum_{i\le t}\sigma_i^2/\sum_{i\le r}\sigma_i^2` (t < r): the dominance
  of the top t directions among the r directions every compared update has.

K runs over :data:`K_SET` below the common rank r, and r itself (:func:`k_values`). A K above an
update's structural rank is never taken silently: :func:`cap_k` caps it at the rank and says so
(a :class:`~deltaspec.errors.DeltaspecWarning`): warn-and-cap, not refuse, so that an adapter with
per-module ranks (``rank_pattern``) still gets every metric.

Pure functions of σ (numpy); no pandas, matplotlib or click.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from deltaspec.errors import DeltaspecWarning
from deltaspec.metrics.spectral import Values, _probs, _scaled, descending

K_SET = (1, 2, 4, 8)


def k_values(r: int) -> tuple[int, ...]:
    """The K of the K-resolved metrics for a common rank ``r``: those of ``K_SET`` below r, and r.

    >>> k_values(16), k_values(4), k_values(1)
    ((1, 2, 4, 8, 16), (1, 2, 4), (1,))
    """
    if r < 1:
        raise ValueError(f"the common rank must be >= 1 (got {r})")
    return (*(k for k in K_SET if k < r), r)


def entropy_within(values: Values, k: int) -> float:
    r"""Normalised entropy of the top ``k`` values among themselves, :math:`H/\ln k` (k ≥ 2).

    NaN for k < 2 (one value has no entropy to normalise) or fewer than k values; 0 for a zero
    spectrum.

    >>> round(entropy_within([2.0, 2.0, 1.0], 2), 6), round(entropy_within([1.0, 0.0, 0.0], 2), 6)
    (1.0, 0.0)
    """
    s = descending(values)
    if k < 2 or s.size < k:
        return math.nan
    p = _probs(s[:k], 1)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(k)) + 0.0 if p.size else 0.0


def share_within(values: Values, t: int, r: int) -> float:
    r"""Energy share of the top ``t`` values within the top ``r``: :math:`\sum_{i\le t}\sigma_i^2 /
    \sum_{i\le r}\sigma_i^2`. NaN when t > r or fewer than r values; 0 for a zero spectrum.

    >>> share_within([3.0, 1.0, 5e-9], 1, 2), share_within([3.0, 1.0, 1.0], 1, 3)
    (0.9, 0.8181818181818182)
    """
    s = descending(values)
    if not 1 <= t <= r or s.size < r:
        return math.nan
    q = _scaled(s[:r])[0] ** 2
    total = q.sum()
    return float(q[:t].sum() / total) if total > 0 else 0.0


def k_metrics(values: Values, r: int) -> dict[str, float]:
    """Every K-resolved metric of one spectrum at common rank ``r`` (see the module docstring).

    >>> m = k_metrics([4.0, 2.0, 1.0, 1.0], 4)
    >>> sorted(m), round(m["share1_of_r"], 4)
    (['entropy_top2', 'entropy_top4', 'share1_of_r', 'share2_of_r'], 0.7273)
    """
    ks = k_values(r)
    out = {f"entropy_top{k}": entropy_within(values, k) for k in ks if k >= 2}
    out |= {f"share{t}_of_r": share_within(values, t, r) for t in ks if t < r}
    return out


def k_columns(r: int) -> tuple[str, ...]:
    """The column names :func:`k_metrics` gives at common rank ``r``, in order.

    >>> k_columns(4)
    ('entropy_top2', 'entropy_top4', 'share1_of_r', 'share2_of_r')
    """
    ks = k_values(r)
    return (*(f"entropy_top{k}" for k in ks if k >= 2), *(f"share{t}_of_r" for t in ks if t < r))


def cap_k(k: int, rank: int, what: str = "--top-k") -> int:
    """``k`` capped at a structural ``rank``, with a one-line warning when it is above it.

    Beyond its structural rank an update's singular values are exact zeros: taking them into a
    top-K metric would pad zeros into the ln K normaliser and report the rank, not the update.

    >>> cap_k(8, 16)
    8
    """
    if rank >= 1 and k > rank:
        warnings.warn(f"warning: {what} {k} is above the structural rank {rank} of some modules: "
                      f"their top-K metrics are taken over their {rank} values (normalised by "
                      f"ln {rank}), not padded with zeros", DeltaspecWarning, stacklevel=2)
        return rank
    return k


__all__ = ["K_SET", "cap_k", "entropy_within", "k_columns", "k_metrics", "k_values",
           "share_within"]
