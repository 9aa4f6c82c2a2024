"""The figures' shared layout: panel grids, palettes, titles, log ticks and legends."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from deltaspec import frames
from deltaspec.errors import UsageError

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
    typed result, or a frame ``analyze``/``compare`` returned, is turned into the report's tables
    first (:func:`deltaspec.frames.as_report_data`)."""
    data = frames.as_report_data(data)
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

