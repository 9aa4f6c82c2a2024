"""What commands print, in one place: the renderer table (table / JSON / CSV), the one number
formatter, the format-from-extension rule; files are written by the one atomic writer of
:mod:`deltaspec.atomic` (re-exported here).

A new output format is one new entry of ``RENDERERS``. pandas is imported only when something is
rendered, so that the command line's ``--help`` stays fast.

>>> fmt_number(0.123456), fmt_number(1.5e-5), fmt_number(float("nan")), fmt_number(3)
('0.1235', '1.50e-05', '–', '3')
>>> format_for(None, "out/metrics.json"), format_for(None, "t.txt"), format_for("csv", "a.json")
('json', 'table', 'csv')
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaspec.atomic import (  # the one writer (deltaspec/atomic.py)
    atomic_path,
    this_rank_writes,
    write_atomic,
)
from deltaspec.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd


def is_missing(v: Any) -> bool:
    """True for None, pandas' NA and NaN (the values every renderer shows as undefined)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
    return type(v).__name__ == "NAType"


def fmt_number(v: Any) -> str:
    """A value for tables and messages: 4 significant digits, ``–`` for undefined."""
    if is_missing(v):
        return "–"
    if hasattr(v, "item") and not isinstance(v, str):
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _jsonable(value: Any) -> Any:
    if is_missing(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts (NaN/NA → None) for JSON."""
    return [{k: _jsonable(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def summary_by_kind(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of the table's numeric columns per module kind."""
    import pandas as pd

    numeric = [c for c in table_columns(df)
               if c not in ("module", "shape") and pd.api.types.is_numeric_dtype(df[c])]
    if df.empty or not numeric:
        return pd.DataFrame()
    out = df.groupby("kind", sort=True)[numeric].mean(numeric_only=True)
    out.insert(0, "modules", df.groupby("kind", sort=True).size())
    return out


@dataclass(frozen=True)
class Printable:
    """What a command prints: ``frame`` (its rows: CSV, and JSON unless ``json`` is given); a
    command's own ``table`` text and ``json`` object where they are not the frame's."""

    frame: pd.DataFrame
    table: Callable[[], str] | None = None
    json: Any = None

    def hidden(self) -> int:
        """How many of the frame's columns the table format leaves out."""
        if self.table is not None or self.frame.empty:
            return 0
        return len(self.frame.columns) - len(table_columns(self.frame))


def table_columns(df: pd.DataFrame) -> list[str]:
    """The columns the table format shows: the table's own, less those with no value at all
    (intruders when they were not counted, base-relative ones without a base)."""
    from deltaspec import columns as cols

    return [c for c in cols.table_columns(list(df.columns)) if not df[c].isna().all()]


def _table(p: Printable) -> str:
    if p.table is not None:
        return p.table()
    df = p.frame
    if df.empty:
        return "(no modules)\n"
    shown = df[table_columns(df)]
    text = shown.to_string(index=False, formatters={c: fmt_number for c in shown.columns})
    summary = summary_by_kind(df)
    if not summary.empty:
        text += "\n\nmean per module kind:\n" + summary.to_string(
            formatters={c: fmt_number for c in summary.columns})
    return text + "\n"


def _json(p: Printable) -> str:
    obj = p.json if p.json is not None else to_records(p.frame)
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _csv(p: Printable) -> str:
    return str(p.frame.to_csv(index=False))


RENDERERS: dict[str, Callable[[Printable], str]] = {"table": _table, "json": _json, "csv": _csv}
FORMATS = tuple(RENDERERS)
EXTENSIONS = {".json": "json", ".csv": "csv"}  # --output FILE without --format: by extension


def format_for(fmt: str | None, output: str | Path | None) -> str:
    """The format asked for, else the one ``output``'s extension names, else ``table``."""
    if fmt is not None:
        if fmt not in RENDERERS:
            raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
        return fmt
    return EXTENSIONS.get(Path(output).suffix.lower(), "table") if output else "table"


def render(what: pd.DataFrame | Printable, fmt: str) -> str:
    """``what`` (a result frame, or a command's :class:`Printable`) in format ``fmt``."""
    p = what if isinstance(what, Printable) else Printable(what)
    if fmt not in RENDERERS:
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return RENDERERS[fmt](p)


def hint(what: pd.DataFrame | Printable, fmt: str) -> str | None:
    """The one-line note the table format adds on stderr when it hides columns."""
    p = what if isinstance(what, Printable) else Printable(what)
    n = p.hidden() if fmt == "table" else 0
    if n <= 0:
        return None
    return (f"note: the table leaves out {n} of {len(p.frame.columns)} columns; "
            "--format csv or --format json (or -o FILE.csv / FILE.json) writes them all")


__all__ = ["EXTENSIONS", "FORMATS", "RENDERERS", "Printable", "atomic_path", "fmt_number",
           "format_for", "hint", "is_missing", "render", "summary_by_kind", "to_records",
           "this_rank_writes", "write_atomic"]
