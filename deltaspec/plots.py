"""Figures of the democracy report: each ``plot_*(data, *, ax=None, …) -> Figure``.

``data`` is the matching table of :class:`deltaspec.report.ReportData` (``spectra``, ``metrics``,
``similarity``, ``grids``), the ReportData itself, or a DataFrame ``deltaspec.analyze`` /
``deltaspec.compare`` returned (one update, or A and B; heatmaps need ``report.collect``'s
vectors); filter a table first to draw fewer kinds or layers. Figures are built without pyplot
(nothing is shown, saved or kept open by matplotlib), so in Jupyter a returned figure displays
once, inline. Pass ``ax`` (one Axes per panel) to draw into
your own figure. ``reference`` (same schema) is overlaid dashed, e.g. the shipped reference curves.
matplotlib is imported only when a plot is made.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from deltaspec import frames
from deltaspec.errors import UsageError
from deltaspec.metrics.table import label as metric_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PANEL_W, PANEL_H = 3.7, 3.0
MAX_COLS = 4
MIN_W = 5.0  # inches: a one-panel figure still has room for its title and legend
CHARS_PER_INCH = 10  # of a 12 pt title
BAND_NOTE = "line: median across layers, band: 10–90 %"


def _table(data: Any, attr: str) -> Any:
    """The ``attr`` table of a ReportData, or ``data`` itself when it already is the table; a
    frame ``analyze``/``compare`` returned is turned into the report's tables first."""
    if frames.is_result(data):
        data = frames.report_data(data)
    if isinstance(data, pd.DataFrame) or not hasattr(data, attr):
        return data
    table = getattr(data, attr)
    if table is None:
        raise UsageError(frames.NO_SPECTRA)
    return table


def _order(df: pd.DataFrame, col: str) -> list[str]:
    s = df[col]
    if isinstance(s.dtype, pd.CategoricalDtype):
        present = set(s.dropna().astype(str))
        return [str(c) for c in s.cat.categories if str(c) in present]
    return [str(x) for x in dict.fromkeys(s.dropna())]


def _palette(labels: Sequence[str], cmap: str = "tab10") -> dict[str, Any]:
    from matplotlib import colormaps

    colors = colormaps[cmap].colors  # type: ignore[attr-defined]
    return {lb: colors[i % len(colors)] for i, lb in enumerate(labels)}


def _kinds(df: pd.DataFrame, kinds: Sequence[str] | None) -> list[str]:
    present = _order(df, "kind")
    if kinds is None:
        return present
    missing = [k for k in kinds if k not in present]
    if missing:
        raise UsageError(f"kinds: {', '.join(missing)} not in the table (it has {', '.join(present)})")
    return list(kinds)


def _wrap(title: str, width_in: float) -> str:
    """Break a title into lines that fit ``width_in`` inches (never inside mathtext ``$…$``)."""
    limit = max(20, int(width_in * CHARS_PER_INCH))
    if "$" not in title or len(title) <= limit:
        return textwrap.fill(title, limit) if "$" not in title else title
    head, _, tail = title.partition(" (")
    return head + ("\n" + textwrap.fill("(" + tail, limit) if tail else "")


def _panels(n: int, ax: Any, title: str) -> tuple[Figure, list[Axes], bool]:
    """(figure, n axes, whether the figure is ours): a grid of ≤ 4 columns, or the caller's axes."""
    if n < 1:
        raise UsageError("nothing to plot: the table is empty")
    if ax is None:
        from matplotlib.figure import Figure

        ncols = min(n, MAX_COLS)
        nrows = math.ceil(n / ncols)
        width = max(PANEL_W * ncols, MIN_W)
        title = _wrap(title, width)
        height = PANEL_H * nrows + 1.0 + 0.3 * title.count("\n")
        fig = Figure(figsize=(width, height), layout="constrained")
        grid = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for extra in grid[n:]:
            fig.delaxes(extra)
        fig.suptitle(title)
        return fig, list(grid[:n]), True
    axes = [ax] if hasattr(ax, "plot") else list(ax)
    if len(axes) < n:
        raise UsageError(f"ax: this figure has {n} panels (one per module kind); pass {n} axes "
                         "or filter the table to fewer kinds")
    try:
        fig = axes[0].get_figure(root=True)  # matplotlib ≥ 3.10: the root even from a subfigure
    except TypeError:
        fig = axes[0].figure
    return fig, axes[:n], False


def _log_ticks(axis: Any) -> None:
    """Plain numbers (1, 10, 0.5) on a log axis; minor labels only where it spans < 2 decades."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    lo, hi = axis.get_view_interval()
    if lo > 0 and hi / lo < 100:
        axis.set_minor_formatter(FuncFormatter(
            lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    else:
        axis.set_minor_formatter(NullFormatter())


def _ylabel(axes: list[Axes], text: str, own: bool) -> None:
    """The y label on the first panel of each row of our grid (every panel of the caller's)."""
    ncols = min(len(axes), MAX_COLS)
    for i, a in enumerate(axes):
        if not own or i % ncols == 0:
            a.set_ylabel(text)


def _legend(fig: Figure, axes: list[Axes], own: bool) -> None:
    handles: dict[str, Any] = {}
    for a in axes:
        for h, lb in zip(*a.get_legend_handles_labels(), strict=False):
            handles.setdefault(lb, h)
    if not handles:
        return
    if own:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 6), frameon=False)
    else:
        axes[0].legend(list(handles.values()), list(handles), fontsize="small")


def _curve_panels(data: Any, col: str, *, ax: Any, reference: Any, kinds: Sequence[str] | None,
                  title: str, ylabel: str, logy: bool) -> Figure:
    """One panel per kind: per label the median curve of ``col`` with its band, references dashed."""
    df = _table(data, "spectra")
    ref = _table(reference, "spectra") if reference is not None else None
    labels = _order(df, "label")
    ref_labels = _order(ref, "label") if ref is not None else []
    colors = _palette(labels + [lb for lb in ref_labels if lb not in labels])
    chosen = _kinds(df, kinds)
    fig, axes, own = _panels(len(chosen), ax, title)
    for a, kind in zip(axes, chosen, strict=False):
        for lb in labels:
            g = df[(df["kind"].astype(str) == kind) & (df["label"].astype(str) == lb)].dropna(subset=[col])
            if g.empty:
                continue
            a.plot(g["i"], g[col], color=colors[lb], lw=1.6, label=lb, zorder=3)
            a.fill_between(g["i"], g[f"{col}_lo"], g[f"{col}_hi"], color=colors[lb], alpha=0.18, lw=0,
                           zorder=2)
        if ref is not None:
            for lb in ref_labels:
                g = ref[(ref["kind"].astype(str) == kind) & (ref["label"].astype(str) == lb)]
                g = g.dropna(subset=[col])
                if not g.empty:
                    a.plot(g["i"], g[col], color=colors[lb], lw=0.9, ls=(0, (4, 3)), alpha=0.6,
                           label=f"{lb} (reference)", zorder=1)
        a.set_xscale("log")
        if logy:
            a.set_yscale("log")
            _low_rank_ylim(a, df[df["kind"].astype(str) == kind], col)
        else:
            a.set_ylim(0, 1)
            a.axhline(0.9, color="0.5", lw=0.8, ls=":")
        a.set_title(kind)
        a.set_xlabel("index i")
        a.grid(True, which="major", alpha=0.3)
        _log_ticks(a.xaxis)
        if logy:
            _log_ticks(a.yaxis)
    _ylabel(axes, ylabel, own)
    _legend(fig, axes, own)
    return fig


def _low_rank_ylim(a: Axes, df: pd.DataFrame, col: str) -> None:
    """Bottom of a log axis: what the lowest-rank update reaches (its band), not the far tail of a
    full-rank one, so that the low-rank curves fill the panel; the tail runs off the bottom."""
    g = df.dropna(subset=[col])
    if g.empty:
        return
    ends = g.groupby("label", observed=True)["i"].max()
    k = int(ends.min())
    if k >= int(ends.max()):
        return
    lows = g.loc[g["i"] <= k, f"{col}_lo"].astype(float)
    lows = lows[lows > 0]
    if not lows.empty:
        a.set_ylim(bottom=0.5 * float(lows.min()), top=1.3)


def plot_spectra(data: Any, *, ax: Any = None, reference: Any = None,
                 kinds: Sequence[str] | None = None) -> Figure:
    """Normalised spectra σᵢ/σ₁ against i (log–log), one panel per module kind, one line per update
    (median across layers, band 10–90 %). ``data``: ``ReportData.spectra``."""
    return _curve_panels(data, "sigma_norm", ax=ax, reference=reference, kinds=kinds, logy=True,
                         ylabel="σᵢ / σ₁", title=f"Normalised singular values σᵢ/σ₁ ({BAND_NOTE})")


def plot_energy(data: Any, *, ax: Any = None, reference: Any = None,
                kinds: Sequence[str] | None = None) -> Figure:
    """Cumulative energy Σ_{j≤i}σⱼ²/Σσ² against i: how many directions carry the update."""
    return _curve_panels(data, "energy", ax=ax, reference=reference, kinds=kinds, logy=False,
                         ylabel="energy share of the top i",
                         title=r"Cumulative energy $\sum_{j\leq i}\sigma_j^2 \,/\, \sum_j \sigma_j^2$"
                               f" ({BAND_NOTE}; dotted: 90 %)")


def plot_entropy_by_layer(data: Any, *, metric: str = "normalized_entropy_topk", ax: Any = None,
                          reference: Any = None, kinds: Sequence[str] | None = None) -> Figure:
    """``metric`` (default: normalised entropy over the top K values) per layer, one line per
    update, one panel per module kind. ``data``: ``ReportData.metrics``."""
    df = _table(data, "metrics")
    ref = _table(reference, "metrics") if reference is not None else None
    if metric == "normalized_entropy_topk" and metric in df.columns and df[metric].isna().all():
        metric = "normalized_entropy"  # a table without its singular values: over all values
    if metric not in df.columns:
        raise UsageError(f"metric {metric!r} is not a column of the table")
    labels = _order(df, "label")
    ref_labels = _order(ref, "label") if ref is not None else []
    colors = _palette(labels + [lb for lb in ref_labels if lb not in labels])
    chosen = _kinds(df, kinds)
    name = metric_label(metric)
    k_note = f", K = {df.attrs['top_k']}" if "top_k" in df.attrs and "topk" in metric else ""
    fig, axes, own = _panels(len(chosen), ax, f"{name[0].upper()}{name[1:]} per layer{k_note}")
    from matplotlib.ticker import MaxNLocator

    for a, kind in zip(axes, chosen, strict=False):
        for src, lbs, style in ((df, labels, "-"), (ref, ref_labels, "--")):
            if src is None:
                continue
            for lb in lbs:
                g = src[(src["kind"].astype(str) == kind) & (src["label"].astype(str) == lb)]
                g = g.dropna(subset=["layer", metric]).sort_values("layer")
                if not g.empty:
                    ref_style = {"lw": 0.9, "alpha": 0.6, "zorder": 1, "ms": 0}
                    a.plot(g["layer"].astype(float), g[metric].astype(float), style, marker="o",
                           color=colors[lb], label=lb if style == "-" else f"{lb} (reference)",
                           **({"ms": 4, "zorder": 3} if style == "-" else ref_style))
        a.set_title(kind)
        a.set_xlabel("layer")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(True, alpha=0.3)
    _ylabel(axes, name, own)
    _legend(fig, axes, own)
    return fig


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


def plot_entropy_summary(data: Any, *, ax: Any = None, reference: Any = None) -> Figure:
    """Mean normalised entropy per update: over the top K values and over all values (bars; error
    bars: standard deviation across modules). ``data``: the report's summary table or a ReportData."""
    df = _summary(data)
    ref = _summary(reference) if reference is not None else None
    labels = list(df["label"].astype(str))
    colors = _palette(labels)
    k = getattr(data, "top_k", None) or df.attrs.get("top_k")
    title = "Mean normalised singular-value entropy per update"
    fig, (a,), own = _panels(1, ax, title)
    if own:
        fig.set_size_inches(max(4.8, 1.5 * len(labels) + 2.5), 4.2)
    else:
        a.set_title(title)
    width = 0.38
    series = (("normalized_entropy_topk", f"top K{'=' + str(k) if k else ''} values", None, 0.95),
              ("normalized_entropy", "all values (÷ ln min(m, n))", "//", 0.45))
    from matplotlib.patches import Patch

    handles: list[Any] = []
    for s, (col, name, hatch, alpha) in enumerate(series):
        x = [i + (s - 0.5) * width for i in range(len(labels))]
        mean, sd = df[col].astype(float), df[f"{col}_std"].astype(float)
        err = [sd.clip(upper=mean), sd.clip(upper=1 - mean)]  # the spread, inside [0, 1]
        bars = a.bar(x, mean, width, yerr=err, capsize=3,
                     color=[colors[lb] for lb in labels], alpha=alpha, hatch=hatch, edgecolor="0.2")
        a.bar_label(bars, fmt="%.3f", label_type="center", fontsize=8,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
        handles.append(Patch(facecolor="0.6", alpha=alpha, hatch=hatch, edgecolor="0.2", label=name))
    if ref is not None:
        for i, lb in enumerate(labels):
            hit = ref[ref["label"].astype(str) == lb]
            if not hit.empty:
                v = float(hit["normalized_entropy_topk"].iloc[0])
                a.hlines(v, i - width, i, colors="black", linestyles="--", lw=1.2)
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", ls="--", label="reference (top K)"))
    a.set_xticks(range(len(labels)), labels)
    a.set_ylabel("normalised entropy (0: one direction, 1: flat)")
    a.set_ylim(0, 1)
    a.set_xlabel("update")
    a.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize="small",
             ncols=len(handles), frameon=False)
    return fig


def _summary(data: Any) -> pd.DataFrame:
    if isinstance(data, pd.DataFrame) and "normalized_entropy_topk_std" in data.columns:
        return data
    if frames.is_result(data):
        data = frames.report_data(data)
    from deltaspec.report.verdict import summary_table

    return summary_table(_table(data, "metrics"))


__all__ = ["plot_energy", "plot_entropy_by_layer", "plot_entropy_summary", "plot_similarity_by_layer",
           "plot_similarity_heatmap", "plot_spectra"]
