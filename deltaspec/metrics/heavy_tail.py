r"""The heavy-tail exponent α of an empirical spectral density, as WeightWatcher fits it.

The eigenvalues λᵢ = σᵢ² of WᵀW (or of ΔWᵀΔW) — those of singular values above the numerical
rank's threshold σ₁·max(m, n)·ε_float32 (exact zeros and round-off carry no tail) — are fitted by
a continuous power law p(λ) ∝ λ^−α for λ ≥ λ_min (Clauset, Shalizi & Newman 2009, the method of
the ``powerlaw`` package that WeightWatcher calls):

- for each candidate λ_min (every distinct value but the largest), the maximum-likelihood (Hill)
  exponent of the n_t values λ ≥ λ_min: α = 1 + n_t / Σ ln(λ/λ_min);
- the Kolmogorov–Smirnov distance D between the tail's empirical CDF, (j)/n_t at its j-th value
  (j = 0 … n_t − 1, ``powerlaw``'s convention), and the fitted CDF 1 − (λ/λ_min)^{1−α};
- the λ_min with the least D gives α.

This is ``powerlaw.Fit(λ, parameter_ranges={"alpha": [1, None]})`` to round-off (tests/
test_health.py). ``powerlaw`` 2.0's own default range caps α below 3 (fits above are dropped
from the x_min search); WeightWatcher reports α above 3 (6 and more for under-trained layers), so
no cap here.

All candidates at once, in numpy (sorted logs and suffix sums; the KS distances in blocks of
candidates): O(n²) arithmetic with no Python loop per candidate, where ``powerlaw`` builds a
fitted distribution object per candidate. α is scale-free: normalising λ (WeightWatcher's
optional 1/N) does not change it.
"""

from __future__ import annotations

import math

import numpy as np

from deltaspec.metrics.spectral import Values

FLOAT32_EPS = float(np.finfo(np.float32).eps)
BLOCK = 1 << 21  # candidate × value entries per block of KS distances (16 MiB of float64)
MIN_VALUES = 3  # two distinct candidates at least (powerlaw returns NaN below)


def esd(values: Values, shape: tuple[int, int]) -> np.ndarray:
    """The ascending eigenvalues λ = σ² of the singular values above the numerical-rank
    threshold σ₁·max(m, n)·ε_float32 (see :func:`deltaspec.metrics.numerical_rank`).

    >>> esd([3.0, 2.0, 1e-12, 0.0], (4, 4)).tolist()
    [4.0, 9.0]
    """
    s = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    if s.size == 0 or s[0] <= 0:
        return np.zeros(0)
    return np.sort(s[s > s[0] * max(shape) * FLOAT32_EPS] ** 2)


def fit_power_law(x: np.ndarray) -> tuple[float, float, float]:
    """(α, x_min, D) of the continuous power law fitted to the positive data ``x`` (ascending
    or not) with x_min chosen by KS distance (see the module text); NaNs with fewer than two
    distinct candidates.

    >>> x = (1.0 - (np.arange(2000) + 0.5) / 2000) ** (-1 / 1.5)  # quantiles of α = 2.5, x_min = 1
    >>> a, xmin, d = fit_power_law(x)
    >>> round(a, 2), round(xmin, 3), d < 0.01
    (2.5, 1.0, True)
    """
    x = np.sort(np.asarray(x, dtype=np.float64))
    x = x[x > 0]
    cand = np.unique(x)[:-1]
    if cand.size < 2:
        return math.nan, math.nan, math.nan
    logs = np.log(x)
    start = np.searchsorted(x, cand, side="left")  # first index of each candidate's tail
    n_t = x.size - start
    suffix = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])
    alpha = 1 + n_t / (suffix[start] - n_t * np.log(cand))
    dist = _ks(logs, start, n_t, alpha)
    best = int(np.argmin(dist))
    return float(alpha[best]), float(cand[best]), float(dist[best])


def _ks(logs: np.ndarray, start: np.ndarray, n_t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The KS distance of every candidate's fit, in blocks of candidates (values below a
    candidate's x_min are masked out)."""
    n = logs.size
    cols = np.arange(n)
    out = np.empty(start.size)
    step = max(1, BLOCK // n)
    for lo in range(0, start.size, step):
        s, nt, a = start[lo: lo + step, None], n_t[lo: lo + step, None], alpha[lo: lo + step, None]
        rel = logs[None, :] - logs[s[:, 0]][:, None]  # ln(x/x_min)
        fitted = -np.expm1((1 - a) * rel)  # 1 − (x/x_min)^(1−α)
        empirical = (cols[None, :] - s) / nt
        diff = np.abs(fitted - empirical)
        diff[cols[None, :] < s] = 0.0
        out[lo: lo + step] = diff.max(axis=1)
    return out


def alpha(values: Values, shape: tuple[int, int]) -> float:
    """The heavy-tail exponent α of the ESD of a matrix of singular values ``values`` and shape
    (out, in) = ``shape`` (NaN when fewer than three eigenvalues are above the threshold).

    >>> sigma = np.sqrt((1.0 - (np.arange(500) + 0.5) / 500) ** (-1 / 2.0))  # λ ~ α = 3
    >>> round(alpha(sigma, (500, 500)), 1)
    3.0
    >>> alpha([1.0, 0.0], (2, 2))
    nan
    """
    lam = esd(values, shape)
    return fit_power_law(lam)[0] if lam.size >= MIN_VALUES else math.nan


__all__ = ["alpha", "esd", "fit_power_law"]
