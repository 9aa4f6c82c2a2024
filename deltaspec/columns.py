"""Every output column, defined once: names, order, dtypes, and which ones the CLI table shows.

The metric columns and their facts come from the metric table, :mod:`deltaspec.metrics.table`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltaspec.metrics.table import METRICS, names
from deltaspec.names import kind_of, layer_of

if TYPE_CHECKING:
    import pandas as pd

IDENTITY = ("module", "layer", "kind", "method", "shape", "rank_bound", "route")
# The metric columns, in order, from the metric table (deltaspec.metrics.table).
SPECTRAL = names("spectral")
BASE_RELATIVE = names("base_relative")
HEAVY_TAIL = names("heavy_tail")  # with Options.heavy_tail (--alpha) only
PAIRWISE = names("pairwise")

INTEGER = frozenset({"rank_bound"} | {m.name for m in METRICS.values() if m.integer})
# Columns that pair as <name>_a / <name>_b in a comparison.
PER_SIDE_IDENTITY = ("method", "rank_bound", "route")

TABLE_ANALYZE = ("module", "shape", "rank_bound", "fro_norm", "entropy", "normalized_entropy",
                 "effective_rank", "stable_rank", "top1_share")
TABLE_BASE = ("relative_norm", "intruders", "bf16_merge_error")
TABLE_COMPARE = ("module", "shape", "normalized_entropy_a", "normalized_entropy_b",
                 "effective_rank_a", "effective_rank_b", "subspace_sim_left",
                 "subspace_sim_right", "cosine")


def analyze_columns(with_base: bool, heavy_tail: bool = False) -> list[str]:
    """Column order of an ``analyze`` table (``heavy_tail``: with the α columns)."""
    return [*IDENTITY, *SPECTRAL, *(BASE_RELATIVE if with_base else ()),
            *(HEAVY_TAIL if heavy_tail else ())]


def compare_columns(with_base: bool, heavy_tail: bool = False) -> list[str]:
    """Column order of a ``compare`` table: identity, each side's metrics, then the pairwise ones."""
    sided = [*PER_SIDE_IDENTITY, *SPECTRAL, *(BASE_RELATIVE if with_base else ()),
             *(HEAVY_TAIL if heavy_tail else ())]
    ident = [c for c in IDENTITY if c not in PER_SIDE_IDENTITY]
    return [*ident, *(f"{c}_{s}" for c in sided for s in ("a", "b")), *PAIRWISE]


def table_columns(columns: list[str]) -> list[str]:
    """The columns the CLI's table shows, out of a frame's columns."""
    wanted: tuple[str, ...]
    if "cosine" in columns:
        wanted = TABLE_COMPARE
    else:
        wanted = TABLE_ANALYZE + (TABLE_BASE if "relative_norm" in columns else ()) + HEAVY_TAIL
    return [c for c in wanted if c in columns]


def is_integer(column: str) -> bool:
    """True for integer-valued columns (also ``rank_a`` etc.)."""
    return column.removesuffix("_a").removesuffix("_b") in INTEGER


def identity(name: str, method: str, shape: tuple[int, int], rank_bound: int,
             route: str) -> dict[str, Any]:
    """The identity columns of one module's row.

    >>> identity("model.layers.3.mlp.up_proj", "lora", (8, 4), 2, "factored")["layer"]
    3
    """
    return {"module": name, "layer": layer_of(name), "kind": kind_of(name), "method": method,
            "shape": f"{shape[0]}×{shape[1]}", "rank_bound": rank_bound, "route": route}


STRING = ("kind", "method", "method_a", "method_b", "route", "route_a", "route_b")


def frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """Rows as the result DataFrame: ``columns`` in order, integer columns as nullable ``Int64``,
    the text columns as ``string``."""
    import pandas as pd

    df = pd.DataFrame(rows, columns=columns)
    for c in columns:
        if is_integer(c) or c == "layer":
            df[c] = df[c].astype("Int64")
    for c in STRING:
        if c in df:
            df[c] = df[c].astype("string")
    return df
