"""Seeds as the unit of a method claim: Welch comparisons of seed-level means, Holm over the pairs.

A claim about a *method* ("MultiLoRA's update is flatter than LoRA's") is a claim about what
another run of that method would give; its uncertainty is the seed-to-seed variation. Each run
(seed) contributes one number — its metric averaged over the modules — and two methods are
compared by Welch's t on those numbers: the difference of means b − a, its interval, a two-sided
p-value and Hedges' g. With several pairs (a chain LoRA < MultiLoRA ≤ full, or the sweep's
claims) the p-values are Holm-adjusted, and a pair's verdict is *holds* / *reversed* when its
adjusted p is below 1 − level and the difference has the expected / the other sign, else
*inconclusive*. The interval printed beside it is the unadjusted Welch one at ``level``.

No pandas here: numpy and scipy.stats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

LEVEL = 0.95


def welch(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
          level: float = LEVEL) -> dict[str, float]:
    """b − a: difference of means, Welch interval, two-sided p, degrees of freedom, Hedges' g.

    >>> r = welch([0.80, 0.82, 0.81], [0.86, 0.85, 0.88])
    >>> round(r["diff"], 4), r["lo"] > 0, r["p"] < 0.05
    (0.0533, True, True)
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"Welch needs at least 2 values per side (got {a.size} and {b.size})")
    d = float(b.mean() - a.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": d, "lo": d, "hi": d, "p": 0.0 if d else 1.0, "dof": math.nan, "g": math.nan}
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    p = float(2 * stats.t.sf(abs(d) / se, dof))
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1))
                       / (a.size + b.size - 2))
    corr = 1 - 3 / (4 * (a.size + b.size) - 9)
    return {"diff": d, "lo": d - half, "hi": d + half, "p": p, "dof": dof,
            "g": d / pooled * corr if pooled else math.nan}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1), in the input order.

    >>> [round(x, 12) for x in holm([0.01, 0.04, 0.03])]
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(pvalues, float)
    m = p.size
    order = np.argsort(p, kind="stable")
    adj = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adj[i] = running
    return [float(x) for x in adj]


def decide(diff: float, p_adjusted: float, sign: int, level: float = LEVEL) -> str:
    """holds / reversed / inconclusive from a difference, its adjusted p and the expected sign.

    >>> decide(0.02, 0.01, +1), decide(0.02, 0.01, -1), decide(0.02, 0.2, +1)
    ('holds', 'reversed', 'inconclusive')
    """
    if math.isnan(p_adjusted) or p_adjusted >= 1 - level or diff == 0:
        return "inconclusive"
    return "holds" if sign * diff > 0 else "reversed"


def compare_seeds(groups: Sequence[tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray,
                                         int]], level: float = LEVEL) -> list[dict[str, Any]]:
    """Each (a values, b values, expected sign of b − a): Welch, Holm over all of them, verdict.

    >>> r = compare_seeds([([0.1, 0.2, 0.15], [0.5, 0.6, 0.55], +1)])
    >>> r[0]["verdict"], r[0]["p_holm"] == r[0]["p"], r[0]["n_runs"]
    ('holds', True, [3, 3])
    """
    rows: list[dict[str, Any]] = [welch(a, b, level) | {"n_runs": [len(a), len(b)], "sign": s}
                                  for a, b, s in groups]
    for row, adj in zip(rows, holm([float(r["p"]) for r in rows]), strict=True):
        row |= {"p_holm": adj, "level": level,
                "verdict": decide(float(row["diff"]), adj, int(row["sign"]), level),
                "method": f"Welch's t over seed-level means, Holm over {len(rows)} pair(s)"}
    return rows


__all__ = ["LEVEL", "compare_seeds", "decide", "holm", "welch"]
