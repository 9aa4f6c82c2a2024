"""The Eckart–Young curve of a ``compress``/``extract`` result: relative error ‖ΔW − ΔW_r‖_F/‖ΔW‖_F
against the rank r kept, one panel per module kind (median across layers, 10–90 % band), with
the ranks the policy chose marked. The curve is exact (from each module's σ, which the result's
``attrs["sigmas"]`` carries).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from deltaspec.errors import UsageError
from deltaspec.plots.layout import BAND_NOTE, _kinds, _legend, _panels, _ylabel

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def error_curve(sigma: np.ndarray) -> np.ndarray:
    """Relative error of the best rank-r approximation for r = 0 … len(σ) (Eckart–Young):
    √(Σ_{i>r}σᵢ²/Σσᵢ²); all zeros for ΔW = 0.

    >>> error_curve(np.array([2.0, 1.0])).round(4).tolist()
    [1.0, 0.4472, 0.0]
    """
    s = np.asarray(sigma, dtype=np.float64)
    e = s * s
    total = e.sum()
    if not total > 0:
        return np.zeros(s.size + 1)
    tail = np.concatenate([np.cumsum(e[::-1])[::-1], [0.0]])
    return np.sqrt(np.maximum(tail, 0.0) / total)


def plot_truncation_error(result: pd.DataFrame, *, ax: Any = None,
                          kinds: list[str] | None = None) -> Figure:
    """Error vs rank per module kind for a ``deltaspec.compress``/``extract`` result: the median
    Eckart–Young curve across the kind's modules with its 10–90 % band, the chosen ranks as
    points (their rel_error). Returns the Figure (never shown or saved)."""
    sigmas = result.attrs.get("sigmas")
    if not sigmas:
        raise UsageError("plot_truncation_error: pass the DataFrame deltaspec.compress or "
                         "deltaspec.extract returned (its attrs carry the singular values)")
    chosen = _kinds(result, kinds)
    fig, axes, own = _panels(len(chosen), ax, f"Truncation error vs rank ({BAND_NOTE})")
    for a, kind in zip(axes, chosen, strict=False):
        rows = result[result["kind"].astype(str) == kind]
        curves = [error_curve(sigmas[m]) for m in rows["module"] if m in sigmas]
        width = max(c.size for c in curves)
        grid = np.array([np.pad(c, (0, width - c.size)) for c in curves])
        r = np.arange(width)
        a.plot(r, np.median(grid, axis=0), color="C0", lw=1.6, label="median module")
        a.fill_between(r, np.quantile(grid, 0.1, axis=0), np.quantile(grid, 0.9, axis=0),
                       color="C0", alpha=0.18, lw=0)
        a.scatter(rows["rank"], rows["rel_error"], color="C3", s=14, zorder=3,
                  label=f"rank kept ({result.attrs.get('policy', 'policy')})")
        a.set_title(kind)
        a.set_xlabel("rank r kept")
        a.set_ylim(0, 1.02)
        a.grid(True, alpha=0.3)
    _ylabel(axes, "‖ΔW − ΔW_r‖ / ‖ΔW‖", own)
    _legend(fig, axes, own)
    return fig


__all__ = ["error_curve", "plot_truncation_error"]
