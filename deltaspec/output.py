"""Rendering result frames as table / JSON / CSV, and writing files atomically."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from deltaspec import columns as cols
from deltaspec.errors import UsageError

FORMATS = ("table", "json", "csv")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{target}: folder {parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the user's usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _jsonable(value: Any) -> Any:
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value


def to_records(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts (NaN/NA → None) for JSON."""
    return [{k: _jsonable(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def summary_by_kind(df: pd.DataFrame) -> pd.DataFrame:
    """Mean of the table's numeric columns per module kind."""
    numeric = [c for c in cols.table_columns(list(df.columns))
               if c not in ("module", "shape") and pd.api.types.is_numeric_dtype(df[c])]
    if df.empty or not numeric:
        return pd.DataFrame()
    out = df.groupby("kind", sort=True)[numeric].mean(numeric_only=True)
    out.insert(0, "modules", df.groupby("kind", sort=True).size())
    return out


def _fmt(v: Any) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def render(df: pd.DataFrame, fmt: str) -> str:
    """The frame as ``table`` (selected columns + per-kind summary), ``json`` or ``csv``."""
    if fmt == "json":
        return json.dumps(to_records(df), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt != "table":
        raise UsageError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if df.empty:
        return "(no modules)\n"
    shown = df[cols.table_columns(list(df.columns))]
    text = shown.to_string(index=False, formatters={c: _fmt for c in shown.columns})
    summary = summary_by_kind(df)
    if not summary.empty:
        text += "\n\nmean per module kind:\n" + summary.to_string(
            formatters={c: _fmt for c in summary.columns})
    return text + "\n"
