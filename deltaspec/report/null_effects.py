"""Each verdict pair beside its nulls: how much of an observed difference a null already gives.

For a pair (a, b) of the expected order and the verdict's metric, the observed difference b − a is
restated with one side replaced by a null of that side (:mod:`deltaspec.report.null_updates`):

- ``random``: each side minus its own random same-shape, same-rank null (b − b₀) − (a − a₀): the
  difference beyond what shape and structural rank alone give;
- ``projected``: b (a full fine-tune) replaced by its own update projected on a random rank-r input
  subspace: is the full FT still more democratic than the adapter at the adapter's rank?
- ``equalised``: a MultiLoRA side replaced by the same factors with equalised |sᵢ|: how much of the
  difference the spread of the learned scalings makes.

With ≥ 2 runs per method each restated difference gets a Welch interval over the seed-level
means (descriptive, beside the verdict; not in its Holm family); with one run, a point value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from deltaspec.report import seeds as SD


def run_means(frame: pd.DataFrame, label: str, metric: str) -> np.ndarray:
    """One value per run of ``label``: ``metric`` averaged over its modules (seed-level means)."""
    g = frame[frame["label"].astype(str) == label]
    if metric not in g or g.empty:
        return np.array([])
    runs = g["run"] if "run" in g else pd.Series(0, index=g.index)
    return g.groupby(runs.to_numpy())[metric].mean().to_numpy(float)


def _effect(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """b − a over runs: Welch with ≥ 2 runs a side, else the point difference."""
    if a.size >= 2 and b.size >= 2:
        w = SD.welch(a, b)
        return {"diff": w["diff"], "ci_low": w["lo"], "ci_high": w["hi"], "unit": "seeds"}
    d = float(b.mean() - a.mean()) if a.size and b.size else math.nan
    return {"diff": d, "ci_low": math.nan, "ci_high": math.nan, "unit": "point"}


def null_effects(metrics: pd.DataFrame, nulls: pd.DataFrame, order: Sequence[str],
                 metric: str) -> list[dict[str, Any]]:
    """Per consecutive pair of ``order`` and null kind that applies: the observed b − a and the
    same difference with a side replaced by its null (see the module docstring)."""
    out = []

    def of(kind: str, label: str) -> np.ndarray:
        return run_means(nulls[nulls["null"] == kind], label, metric)

    for a, b in zip(order, order[1:], strict=False):
        xa, xb = run_means(metrics, a, metric), run_means(metrics, b, metric)
        if not xa.size or not xb.size:
            continue
        observed = _effect(xa, xb)
        ra, rb = of("random", a), of("random", b)
        cases = []
        if ra.size == xa.size and rb.size == xb.size and ra.size:
            cases.append(("random", "beyond each side's random same-rank null", xa - ra, xb - rb))
        for side, label in (("b", b), ("a", a)):
            for kind, what in (("projected", f"{label} projected on a random rank-r input subspace"),
                               ("equalised", f"{label} with equalised scalings |sᵢ|")):
                nv = of(kind, label)
                if nv.size:
                    cases.append((kind, what, nv if side == "a" else xa, nv if side == "b" else xb))
        for kind, what, na, nb in cases:
            out.append({"a": a, "b": b, "metric": metric, "null": kind, "what": what,
                        "observed": observed["diff"], **_effect(na, nb)})
    return out


__all__ = ["null_effects", "run_means"]
