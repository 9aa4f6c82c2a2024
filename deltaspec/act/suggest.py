"""The rank-suggestion table: per module, the rank each policy of
:data:`deltaspec.act.table.SUGGESTIONS` (and the one asked for) gives — singular values only,
nothing written. ``deltaspec compress ADAPTER --suggest`` prints it; :func:`suggest_ranks`
returns it as a DataFrame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from deltaspec.act import table
from deltaspec.act.run import load_deltas, selected
from deltaspec.metrics.ranks import Policy, parse_policy
from deltaspec.names import kind_of
from deltaspec.options import Options, make_options

if TYPE_CHECKING:
    import pandas as pd


def suggestion_rows(path: Any, base: Any, policy: Policy | None, opts: Options,
                    config: Any = None) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows, notes): one row per module with the rank of every suggested policy."""
    from deltaspec.loop import run

    deltas = load_deltas(path, base, opts, config)
    notes: list[str] = []
    names = selected(deltas, opts, notes)
    spectra = run(deltas, opts=opts, modules=names, metrics=False).spectra
    others = {c: parse_policy(p, policy.min_rank, policy.max_rank) if policy else parse_policy(p)
              for c, p in table.SUGGESTIONS.items()}
    rows = []
    for name in names:
        d, sp = deltas[name], spectra[name]
        row = {"module": name, "kind": kind_of(name), "shape": f"{d.shape[0]}×{d.shape[1]}",
               "rank_in": d.rank_bound,
               "rank": policy.rank(sp.values, d.shape) if policy is not None else None}
        row |= {col: p.rank(sp.values, d.shape) for col, p in others.items()}
        rows.append(row)
    return rows, notes


def suggest_ranks(path: Any, base: Any = None, rank: Any = None, *, min_rank: int | None = None,
                  max_rank: int | None = None, config: Any = None,
                  **options: Any) -> pd.DataFrame:
    """The rank each policy gives, per module of the update at ``path`` (``rank``: also the
    policy asked for, column ``rank``); clamps apply to every policy.

    Columns: module, kind, shape, rank_in, rank, then one per policy of
    :data:`deltaspec.act.table.SUGGESTIONS` (energy 0.9, energy 0.99, gd, mp).
    """
    import pandas as pd

    policy = parse_policy(rank, min_rank, max_rank) if rank is not None else None
    rows, notes = suggestion_rows(path, base, policy, make_options(options, public=True), config)
    df = pd.DataFrame(rows, columns=list(table.SUGGEST_COLUMNS))
    df.attrs["notes"] = notes
    return df


__all__ = ["suggest_ranks", "suggestion_rows"]
