"""Uncertainty of the report's comparisons: bootstrap intervals, effect sizes, three-way verdicts,
and the chance level of the subspace similarity φ.

A comparison of two updates a and b on a per-module metric (e.g. the top-K normalised entropy)
is the difference of their means, b − a. Its interval is a percentile bootstrap that resamples
the modules (paired: the same module in a and b, since modules differ far more from each other
than the methods do) and, when a method is given as several runs (seeds), the runs of each
method independently. The effect size is Cohen's d_z of the module-paired differences (their
mean over their standard deviation). The verdict is three-way at the interval's level: *holds*
when the interval lies on the expected side of 0, *reversed* when it lies on the other side,
*inconclusive* when it contains 0. The bootstrap is seeded: the same inputs give the same numbers.

No pandas or matplotlib here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
SEED = 0
VERDICTS = ("holds", "reversed", "inconclusive")


def three_way(lo: float, hi: float, sign: int = 1) -> str:
    """The verdict of an interval [lo, hi] of b − a when b − a is expected to have ``sign``.

    >>> three_way(0.01, 0.03), three_way(-0.03, -0.01), three_way(-0.01, 0.02)
    ('holds', 'reversed', 'inconclusive')
    """
    if math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if sign * lo > 0 and sign * hi > 0:
        return "holds"
    if sign * lo < 0 and sign * hi < 0:
        return "reversed"
    return "inconclusive"


def bootstrap_difference(a: np.ndarray, b: np.ndarray, *, level: float = LEVEL,
                         n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, Any]:
    """Mean difference b − a of a per-module metric, its bootstrap interval and effect size.

    Args:
        a, b: (runs, modules) arrays of one metric; column j is the same module in a and b.
            One run each is the usual case; several runs (seeds) are resampled too.
        level: two-sided interval level; n_boot: bootstrap replicates; seed: their seed.

    >>> a = np.array([[0.50, 0.60, 0.70, 0.80]])
    >>> r = bootstrap_difference(a, a + 0.1)
    >>> round(r["diff"], 6), round(r["ci_low"], 6), round(r["ci_high"], 6), r["verdict"]
    (0.1, 0.1, 0.1, 'holds')
    """
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"a and b must hold the same modules (got {a.shape} and {b.shape})")
    paired = b.mean(axis=0) - a.mean(axis=0)  # (modules,)
    diff = float(paired.mean())
    rng = np.random.default_rng(seed)
    m = a.shape[1]
    mods = rng.integers(0, m, size=(n_boot, m))  # (n_boot, modules)
    ra = rng.integers(0, a.shape[0], size=(n_boot, a.shape[0]))  # (n_boot, runs_a)
    rb = rng.integers(0, b.shape[0], size=(n_boot, b.shape[0]))  # (n_boot, runs_b)
    # mean over the resampled runs of each method, then over the resampled modules (paired)
    mean_a = a[ra].mean(axis=1)  # (n_boot, modules)
    mean_b = b[rb].mean(axis=1)
    boots = np.take_along_axis(mean_b - mean_a, mods, axis=1).mean(axis=1)  # (n_boot,)
    alpha = (1 - level) / 2
    lo, hi = (float(x) for x in np.quantile(boots, [alpha, 1 - alpha]))
    sd = float(paired.std(ddof=1)) if m > 1 else math.nan
    d_z = diff / sd if sd and not math.isnan(sd) and sd > 0 else (math.inf if diff else 0.0)
    return {"diff": diff, "ci_low": lo, "ci_high": hi, "level": level,
            "effect_size": d_z, "effect_size_kind": "Cohen's d_z (module-paired)",
            "n_modules": m, "n_runs": [int(a.shape[0]), int(b.shape[0])],
            "verdict": three_way(lo, hi, 1), "method": f"bootstrap ({n_boot} replicates, "
            f"seed {seed}) over modules{' and runs' if max(a.shape[0], b.shape[0]) > 1 else ''}"}


def combine(verdicts: list[str]) -> str:
    """One status for a chain of pairs: reversed if any is, holds if all do, else inconclusive.

    >>> combine(["holds", "holds"]), combine(["holds", "inconclusive"]), combine(["holds", "reversed"])
    ('holds', 'inconclusive', 'reversed')
    """
    if any(v == "reversed" for v in verdicts):
        return "reversed"
    return "holds" if verdicts and all(v == "holds" for v in verdicts) else "inconclusive"


def random_subspace_phi(n: int, k: int, draws: int = 200, seed: int = SEED) -> tuple[float, float]:
    """Mean and standard deviation of φ(k, k) between two random k-dimensional subspaces of ℝⁿ.

    φ = ‖U_aᵀU_b‖²_F / k; for uniformly random subspaces its mean is exactly k/n, and the spread
    is estimated from ``draws`` seeded pairs of Haar-random orthonormal bases.

    >>> mean, sd = random_subspace_phi(128, 8)
    >>> round(mean, 4), sd < 0.05
    (0.0625, True)
    """
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n (got k={k}, n={n})")
    rng = np.random.default_rng(seed)
    vals = np.empty(draws)
    for i in range(draws):
        qa, _ = np.linalg.qr(rng.standard_normal((n, k)))
        qb, _ = np.linalg.qr(rng.standard_normal((n, k)))
        vals[i] = np.sum((qa.T @ qb) ** 2) / k
    return k / n, float(vals.std(ddof=1))


__all__ = ["LEVEL", "VERDICTS", "bootstrap_difference", "combine", "random_subspace_phi",
           "three_way"]
