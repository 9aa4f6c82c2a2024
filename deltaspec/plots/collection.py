"""Figures of a collection (``deltaspec zoo``): the N×N similarity heatmap in dendrogram order,
the dendrogram, and the shared-basis curves. Each takes a :class:`deltaspec.collection.ZooResult`
and returns a matplotlib Figure (built without pyplot: nothing is shown or saved)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from deltaspec.errors import UsageError
from deltaspec.plots.layout import _legend, _log_ticks, _panels, _ylabel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ANNOTATE_MAX = 12  # write the values into the cells up to this many updates


def _result(data: Any) -> Any:
    if not hasattr(data, "matrix") or not hasattr(data, "tree"):
        raise UsageError("expected the result of deltaspec.zoo(...)")
    return data


def plot_zoo_heatmap(data: Any, *, value: str = "cosine", ax: Any = None) -> Figure:
    """The N×N whole-model similarity (``value``: ``cosine``, ``phi_left`` or ``phi_right``) in
    dendrogram order, so that groups show as blocks on the diagonal."""
    res = _result(data)
    if value not in ("cosine", "phi_left", "phi_right"):
        raise UsageError(f"value {value!r}: one of cosine, phi_left, phi_right")
    order = [res.labels[i] for i in res.tree.order]
    sq = res.matrix.pivot(index="a", columns="b", values=value).loc[order, order].to_numpy(float)
    n = len(order)
    title = {"cosine": "Whole-model cosine of the updates",
             "phi_left": "Mean φ(K, K) over modules, left vectors",
             "phi_right": "Mean φ(K, K) over modules, right vectors"}[value]
    if ax is None:
        from matplotlib.figure import Figure

        side = min(12.0, max(4.5, 0.28 * n + 2.5))
        fig = Figure(figsize=(side + 1.2, side), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.get_figure()
    lo = -1.0 if value == "cosine" and np.nanmin(sq) < 0 else 0.0
    image = ax.imshow(sq, vmin=lo, vmax=1.0, cmap="RdBu_r" if lo < 0 else "viridis",
                      interpolation="nearest")
    ax.set_title(title + f" (K={res.k})" if value != "cosine" else title)
    step = max(1, n // 40)
    ax.set_xticks(range(0, n, step), order[::step], rotation=90, fontsize=7 if n > 20 else 9)
    ax.set_yticks(range(0, n, step), order[::step], fontsize=7 if n > 20 else 9)
    if n <= ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{sq[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(sq[i, j]) > 0.6 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label=value)
    return fig


def plot_dendrogram(data: Any, *, ax: Any = None) -> Figure:
    """The hierarchical clustering on 1 − |cosine| (average linkage), leaves coloured by the
    suggested groups, the cut drawn dashed."""
    from scipy.cluster.hierarchy import dendrogram

    res = _result(data)
    n = len(res.labels)
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(min(16.0, max(5.0, 0.22 * n + 2.0)), 4.2), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.get_figure()
    z = res.tree.linkage
    groups = res.tree.groups
    cut = float(z[n - groups, 2]) if 1 < groups < n else None
    dendrogram(z, labels=res.labels, ax=ax, color_threshold=cut if cut is not None else 0.0,
               above_threshold_color="#888888", leaf_font_size=7 if n > 20 else 9)
    if cut is not None:
        below = float(z[n - groups - 1, 2]) if n - groups - 1 >= 0 else 0.0
        ax.axhline((cut + below) / 2, ls="--", color="#c0392b", lw=1,
                   label=f"{groups} suggested groups")
        ax.legend(fontsize="small", loc="upper right")
    ax.set_ylabel("1 − |cosine| (average linkage)")
    ax.set_title(f"Clusters of the updates: {groups} suggested group{'s' if groups != 1 else ''}")
    return fig


def plot_shared_basis(data: Any, *, ax: Any = None) -> Figure:
    """Per module kind: the energy of all N updates kept by the top-d directions the collection
    shares (median across layers, band 10–90 %), left (output) and right (input) sides, with
    the 90 % and 99 % levels."""
    res = _result(data)
    df = res.basis
    kinds = [str(k) for k in df["kind"].cat.categories if (df["kind"] == k).any()]
    fig, axes, own = _panels(len(kinds), ax, f"Shared basis of {len(res.labels)} updates: energy "
                             "kept by the top-d common directions")
    styles = {"left": ("#1f77b4", "-", "left (output) directions"),
              "right": ("#d62728", "--", "right (input) directions")}
    for a, kind in zip(axes, kinds, strict=False):
        for side, (color, ls, label) in styles.items():
            part = df[(df["kind"] == kind) & (df["side"] == side)]
            a.plot(part["d"], part["energy"], color=color, ls=ls, lw=1.4, label=label)
            a.fill_between(part["d"], part["energy_lo"], part["energy_hi"], color=color, alpha=0.15,
                           lw=0)
        for level in (0.9, 0.99):
            a.axhline(level, color="#888888", lw=0.7, ls=":")
        a.set_xscale("log")
        _log_ticks(a.xaxis)
        a.set_ylim(0, 1.02)
        a.set_title(kind)
        a.set_xlabel("d (shared directions)")
    _ylabel(axes, "energy kept", own)
    _legend(fig, axes, own)
    return fig


__all__ = ["plot_dendrogram", "plot_shared_basis", "plot_zoo_heatmap"]
