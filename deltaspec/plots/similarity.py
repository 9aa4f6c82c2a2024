"""Subspace-similarity figures: φ(i, j) heatmaps and φ(K, K) per layer with the chance band."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from deltaspec.errors import UsageError
from deltaspec.plots.layout import _kinds, _legend, _order, _palette, _panels, _table, _ylabel

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _grids(data: Any) -> list[Any]:
    grids = _table(data, "grids")
    return [grids] if hasattr(grids, "values") and hasattr(grids, "label_a") else list(grids)


def plot_similarity_heatmap(data: Any, *, ax: Any = None) -> Figure:
    """Heatmaps of the subspace similarity φ(i, j) of one module between two updates (one panel
    per pair). ``data``: ``ReportData.grids``, a list of grids, or one SimilarityGrid."""
    if isinstance(data, pd.DataFrame):
        raise UsageError("similarity heatmaps need the singular vectors, which a result table does "
                         "not keep: use deltaspec.report.collect(...) or deltaspec.plot_democracy(...)")
    grids = _grids(data)
    if not grids:
        raise UsageError("nothing to plot: similarity needs two or more updates")
    side = "left" if grids[0].side == "left" else "right"
    title = f"Subspace similarity φ(i, j) of the {side} singular vectors of {grids[0].module}"
    fig, axes, own = _panels(len(grids), ax, title)
    image = None
    for a, g in zip(axes, grids, strict=False):
        ka, kb = g.values.shape
        a.set_title(f"{g.label_a} vs {g.label_b}")
        a.set_xlabel(f"j (top-j vectors of {g.label_b})")
        a.set_ylabel(f"i (top-i vectors of {g.label_a})")
        if ka == 0 or kb == 0:
            a.text(0.5, 0.5, "undefined\n(zero update)", ha="center", va="center", transform=a.transAxes)
            continue
        image = a.imshow(g.values, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                         extent=(0.5, kb + 0.5, 0.5, ka + 0.5), interpolation="nearest")
        if ka * kb <= 100:
            for (i, j), v in pd.DataFrame(g.values).stack().items():
                a.text(j + 1, i + 1, f"{v:.2f}", ha="center", va="center", fontsize=7,
                       color="black" if v > 0.6 else "white")
        from matplotlib.ticker import MaxNLocator

        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    if image is not None:
        fig.colorbar(image, ax=axes, label="φ(i, j)", shrink=0.9)
    return fig


def _chance_band(a: Axes, df: pd.DataFrame, side: str) -> None:
    """φ of random subspaces of the same size: mean (dotted) and ± 2 standard deviations (band)."""
    col = f"chance_{side}"
    if col not in df.columns or df[col].dropna().empty:
        return
    m, sd = float(df[col].mean()), float(df[f"{col}_sd"].mean())
    a.axhspan(max(0.0, m - 2 * sd), min(1.0, m + 2 * sd), color="0.5", alpha=0.15, lw=0, zorder=0)
    a.axhline(m, color="0.4", lw=0.8, ls=":", zorder=0)  # explained in the caption


def plot_similarity_by_layer(data: Any, *, side: str = "left", ax: Any = None,
                             kinds: Sequence[str] | None = None) -> Figure:
    """φ(K, K) between each pair of updates per layer, one panel per module kind.
    ``data``: ``ReportData.similarity``."""
    if side not in ("left", "right"):
        raise UsageError(f"side must be 'left' or 'right', not {side!r}")
    df = _table(data, "similarity")
    if df.empty:
        raise UsageError("nothing to plot: similarity needs two or more updates")
    pairs = _order(df, "pair")
    colors = _palette(pairs, "Dark2")
    chosen = _kinds(df, kinds)
    k = int(df.attrs.get("k", df[f"k_{side}"].max()))
    fig, axes, own = _panels(len(chosen), ax, f"Subspace similarity φ(K, K) of the {side} singular "
                             f"vectors per layer (K = {k}, less where an update has lower rank)")
    from matplotlib.ticker import MaxNLocator

    for a, kind in zip(axes, chosen, strict=False):
        for pair in pairs:
            g = df[(df["kind"].astype(str) == kind) & (df["pair"].astype(str) == pair)]
            g = g.dropna(subset=["layer"]).sort_values("layer")
            if not g.empty:
                a.plot(g["layer"].astype(float), g[f"phi_{side}"].astype(float), marker="o", ms=4,
                       color=colors[pair], label=pair)
        _chance_band(a, df[df["kind"].astype(str) == kind], side)
        a.set_title(kind)
        a.set_xlabel("layer")
        a.set_ylim(0, 1)
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(True, alpha=0.3)
    _ylabel(axes, "φ(K, K)", own)
    _legend(fig, axes, own)
    return fig
