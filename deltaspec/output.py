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

import csv
import io
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

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


@dataclass(frozen=True)
class Rows:
    """A result table as plain rows (dicts in ``columns`` order): the table of every
    :class:`~deltaspec.result.Analysis`. Every format is rendered without pandas, and CSV/JSON
    are byte for byte what the rows' frame (:func:`deltaspec.columns.frame`) gives."""

    rows: list[dict[str, Any]]
    columns: list[str]

    def csv(self) -> str:
        """``DataFrame.to_csv(index=False)`` of these rows: floats as ``repr``, undefined empty."""
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator=os.linesep)
        out.writerow(self.columns)
        for row in self.rows:
            out.writerow(["" if is_missing(v := row.get(c)) else repr(float(v))
                          if isinstance(v, float) else str(v) for c in self.columns])
        return buf.getvalue()

    def records(self) -> list[dict[str, Any]]:
        """The rows as :func:`to_records` gives the frame's (undefined → None)."""
        return [{c: _jsonable(row.get(c)) for c in self.columns} for row in self.rows]


@dataclass(frozen=True)
class Printable:
    """What a command prints: ``frame`` (its rows — a DataFrame or :class:`Rows` — CSV, and JSON
    unless ``json`` is given); a command's own ``table`` text and ``json`` object where they are
    not the frame's."""

    frame: pd.DataFrame | Rows
    table: Callable[[], str] | None = None
    json: Any = None

    def columns(self) -> list[str]:
        """The frame's columns, in order."""
        return list(self.frame.columns)

    def records(self) -> list[dict[str, Any]]:
        """The frame's rows as plain dicts (undefined → None)."""
        return self.frame.records() if isinstance(self.frame, Rows) else to_records(self.frame)

    def hidden(self) -> int:
        """How many of the frame's columns the table format leaves out."""
        if self.table is not None:
            return 0
        records = self.records()
        return len(self.columns()) - len(table_columns(self.columns(), records)) if records else 0


def table_columns(columns: list[str], records: list[dict[str, Any]]) -> list[str]:
    """The columns the table format shows: the table's own, less those with no value at all
    (intruders when they were not counted, base-relative ones without a base).

    >>> table_columns(["module", "shape", "intruders"], [{"module": "m", "shape": "2×2", "intruders": None}])
    ['module', 'shape']
    """
    from deltaspec import columns as cols

    return [c for c in cols.table_columns(columns) if any(not is_missing(r.get(c)) for r in records)]


def text_table(header: list[str], body: list[list[str]], left: int = 0) -> str:
    """Fixed-width text: every column as wide as its widest cell, one space apart, right-justified
    (the first ``left`` columns left-justified).

    >>> print(text_table(["kind", "n"], [["q", "12"], ["up", "3"]], left=1))
    kind  n
    q    12
    up    3
    """
    widths = [max(len(cell) for cell in col) for col in zip(header, *body, strict=True)]
    return "\n".join(" ".join(cell.ljust(w) if i < left else cell.rjust(w)
                              for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
                     for line in [header, *body])


def kind_means(columns: list[str], records: list[dict[str, Any]]) -> str:
    """The table's numeric columns averaged per module kind (undefined values left out), as text;
    empty when there is no numeric column."""
    numeric = [c for c in columns if c not in ("module", "shape") and all(
        isinstance(r.get(c), (int, float)) or is_missing(r.get(c)) for r in records)]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if not is_missing(r.get("kind")):
            kinds.setdefault(str(r["kind"]), []).append(r)
    if not numeric or not kinds:
        return ""
    body = []
    for kind, rows in sorted(kinds.items()):
        means = []
        for c in numeric:
            vals = [float(r[c]) for r in rows if not is_missing(r.get(c))]
            means.append(fmt_number(sum(vals) / len(vals) if vals else math.nan))
        body.append([kind, str(len(rows)), *means])
    return text_table(["kind", "modules", *numeric], body, left=1)


def _table(p: Printable) -> str:
    if p.table is not None:
        return p.table()
    records = p.records()
    if not records:
        return "(no modules)\n"
    shown = table_columns(p.columns(), records)
    text = text_table(shown, [[fmt_number(r.get(c)) for c in shown] for r in records])
    summary = kind_means(shown, records) if "kind" in p.columns() else ""
    if summary:
        text += "\n\nmean per module kind:\n" + summary
    return text + "\n"


def _json(p: Printable) -> str:
    obj = p.json if p.json is not None else p.records()
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def _csv(p: Printable) -> str:
    return p.frame.csv() if isinstance(p.frame, Rows) else str(p.frame.to_csv(index=False))


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


Result = Union["pd.DataFrame", Printable, Rows]  # what a command prints


def render(what: Result, fmt: str) -> str:
    """``what`` (a result frame or :class:`Rows`, or a command's :class:`Printable`) in ``fmt``."""
    p = what if isinstance(what, Printable) else Printable(what)
    if fmt not in RENDERERS:
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    return RENDERERS[fmt](p)


def hint(what: Result, fmt: str) -> str | None:
    """The one-line note the table format adds on stderr when it hides columns."""
    p = what if isinstance(what, Printable) else Printable(what)
    n = p.hidden() if fmt == "table" else 0
    if n <= 0:
        return None
    return (f"note: the table leaves out {n} of {len(p.columns())} columns; "
            "--format csv or --format json (or -o FILE.csv / FILE.json) writes them all")


__all__ = ["EXTENSIONS", "FORMATS", "RENDERERS", "Printable", "Result", "Rows", "atomic_path",
           "fmt_number", "format_for", "hint", "is_missing", "kind_means", "render", "table_columns",
           "text_table", "this_rank_writes", "to_records", "write_atomic"]
