"""Curves and bars of the report: normalised spectra, cumulative energy, entropy per layer and
per update."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from deltaspec import frames
from deltaspec.errors import UsageError
from deltaspec.metrics.table import label as metric_label
from deltaspec.plots.layout import (
    BAND_NOTE,
    _kinds,
    _legend,
    _log_ticks,
    _order,
    _palette,
    _panels,
    _table,
    _ylabel,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


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
    data = frames.as_report_data(data)
    from deltaspec.report.verdict import summary_table

    return summary_table(_table(data, "metrics"))
