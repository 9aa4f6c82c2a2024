"""Figures of a training trajectory (:func:`deltaspec.trajectory.trajectory`'s frame): a metric
against the step per module kind, drift against the step, and a metric over (layer, step).

Every function takes the trajectory frame (filtered or not) and returns a Figure (nothing shown or
saved). A frame with a ``label`` column (several runs, e.g. one per method) draws one line per
label.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from deltaspec.errors import UsageError
from deltaspec.metrics.table import label as metric_label
from deltaspec.plots.layout import BAND_NOTE, _kinds, _legend, _order, _palette, _panels, _ylabel

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DRIFT_SHOWN = (("phi_final_left", "φ(K, K) to the final update (left)"),
               ("phi_prev_left", "φ(K, K) to the previous checkpoint (left)"),
               ("cosine_final", "cosine to the final update"))


def _check(df: Any, *columns: str) -> pd.DataFrame:
    if not isinstance(df, pd.DataFrame) or "step" not in df.columns:
        raise UsageError("expected the frame deltaspec.trajectory() returns (a 'step' column)")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise UsageError(f"column {missing[0]!r} is not in the trajectory frame")
    if df.empty:
        raise UsageError("nothing to plot: the trajectory frame is empty")
    return df


def _band(a: Axes, g: pd.DataFrame, col: str, color: Any, name: str | None) -> None:
    """Median across the rows of each step, and the 10–90 % band."""
    q = g.groupby("step")[col].quantile([0.1, 0.5, 0.9]).unstack()
    a.plot(q.index, q[0.5], color=color, lw=1.6, marker="o", ms=3, label=name, zorder=3)
    a.fill_between(q.index, q[0.1], q[0.9], color=color, alpha=0.18, lw=0, zorder=2)


def plot_trajectory(df: pd.DataFrame, metric: str = "normalized_entropy", *, ax: Any = None,
                    kinds: Sequence[str] | None = None, title: str | None = None) -> Figure:
    """``metric`` against the step, one panel per module kind: median across layers with the
    10–90 % band (one line per ``label`` when the frame has that column)."""
    df = _check(df, metric, "kind")
    df = df.dropna(subset=[metric]).assign(**{metric: lambda d: d[metric].astype(float)})
    labels = _order(df, "label") if "label" in df.columns else [None]
    colors = _palette([str(lb) for lb in labels])
    chosen = _kinds(df, kinds)
    name = metric_label(metric)
    fig, axes, own = _panels(len(chosen), ax, title or f"{name[0].upper()}{name[1:]} over "
                                                       f"training ({BAND_NOTE})")
    for a, kind in zip(axes, chosen, strict=False):
        for lb in labels:
            g = df[df["kind"].astype(str) == kind]
            if lb is not None:
                g = g[g["label"].astype(str) == lb]
            if not g.empty:
                _band(a, g, metric, colors[str(lb)], lb)
        a.set_title(kind)
        a.set_xlabel("step")
        a.grid(True, alpha=0.3)
    _ylabel(axes, name, own)
    _legend(fig, axes, own)
    return fig


def plot_drift(df: pd.DataFrame, *, ax: Any = None,
               kinds: Sequence[str] | None = None) -> Figure:
    """Drift against the step: φ(K, K) to the final update, φ to the previous checkpoint and the
    cosine to the final update, one panel each, one line per module kind (median across layers,
    band 10–90 %)."""
    df = _check(df, "kind", *(c for c, _ in DRIFT_SHOWN))
    chosen = _kinds(df, kinds)
    colors = _palette(chosen)
    k = df.attrs.get("k")
    fig, axes, own = _panels(len(DRIFT_SHOWN), ax, "Drift over training"
                             + (f" (K = {k}; " if k else " (") + f"{BAND_NOTE})")
    for a, (col, name) in zip(axes, DRIFT_SHOWN, strict=False):
        for kind in chosen:
            g = df[df["kind"].astype(str) == kind].dropna(subset=[col])
            if not g.empty:
                _band(a, g.assign(**{col: g[col].astype(float)}), col, colors[kind], kind)
        a.set_title(name, fontsize="medium")
        a.set_xlabel("step")
        a.set_ylim(-0.02 if col != "cosine_final" else -1.02, 1.02)
        a.grid(True, alpha=0.3)
    _legend(fig, axes, own)
    return fig


def plot_trajectory_heatmap(df: pd.DataFrame, metric: str = "normalized_entropy", *,
                            ax: Any = None, kinds: Sequence[str] | None = None) -> Figure:
    """``metric`` over (layer, step), one panel per module kind (shared colour scale)."""
    df = _check(df, metric, "kind", "layer").dropna(subset=[metric, "layer"])
    if df.empty:
        raise UsageError(f"nothing to plot: no {metric} with a layer index in the frame")
    chosen = _kinds(df, kinds)
    name = metric_label(metric)
    vals = df[metric].astype(float)
    lo, hi = float(vals.min()), float(vals.max())
    fig, axes, own = _panels(len(chosen), ax, f"{name[0].upper()}{name[1:]} per layer and step")
    image = None
    for a, kind in zip(axes, chosen, strict=False):
        g = df[df["kind"].astype(str) == kind]
        grid = g.pivot_table(index="layer", columns="step", values=metric, aggfunc="mean")
        steps = [str(s) for s in grid.columns]
        image = a.imshow(grid.to_numpy(dtype=float), aspect="auto", origin="lower", vmin=lo,
                         vmax=hi, cmap="viridis", interpolation="nearest")
        a.set_xticks(range(len(steps)), steps, rotation=45 if len(steps) > 6 else 0)
        a.set_yticks(range(len(grid.index)), [str(int(x)) for x in grid.index])
        a.set_title(kind)
        a.set_xlabel("step")
    _ylabel(axes, "layer", own)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.85, label=name)
    return fig


__all__ = ["plot_drift", "plot_trajectory", "plot_trajectory_heatmap"]
