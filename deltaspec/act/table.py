"""The error table of ``compress``/``extract`` (``compression.csv``) and the rank-suggestion
table, declared once: their columns, one row per module, the totals line, and how each is printed
(table / CSV / JSON through :mod:`deltaspec.output`). No torch, no pandas here.

``compression.csv`` columns (exactly these, in this order):

- ``module``, ``kind`` (its last path component);
- ``rank_in``: the structural rank of the input's ΔW (Σ r of its factors, min(m, n) if dense);
- ``rank``: the rank kept;
- ``energy_kept`` Σ_{i≤k}σᵢ²/Σσᵢ², ``rel_error`` ‖ΔW − ΔW_k‖_F/‖ΔW‖_F = √(Σ_{i>k}σᵢ²/Σσᵢ²)
  (Eckart–Young, exact from the spectrum), ``sigma_next`` σ_{k+1}/σ₁ (ΔW = 0: 1, 0, 0);
- ``params_in`` (r·(m + n) factored, m·n dense), ``params_out`` k·(m + n);
- ``saved_rel_error``: ‖ΔW − B̂·Â‖_F/‖ΔW‖_F of the factors as written (rounded to the saved
  dtype).

>>> r = row("m.q_proj", 4, 2, (1.0, 0.0, 0.0), 24, 12, 0.0)
>>> totals([r])["params_out"], fmt_totals(totals([r])).split(":")[0]
(12, 'total')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from deltaspec.names import kind_of
from deltaspec.output import Printable, Rows, fmt_number, text_table

COLUMNS = ("module", "kind", "rank_in", "rank", "energy_kept", "rel_error", "sigma_next",
           "params_in", "params_out", "saved_rel_error")
# The policies the suggestion table shows: column → policy.
SUGGESTIONS = {"rank_energy90": "energy:0.9", "rank_energy99": "energy:0.99", "rank_gd": "gd",
               "rank_mp": "mp"}
SUGGEST_COLUMNS = ("module", "kind", "shape", "rank_in", "rank", *SUGGESTIONS)


def row(module: str, rank_in: int, rank: int, errors: tuple[float, float, float],
        params_in: int, params_out: int, saved_rel_error: float) -> dict[str, Any]:
    """One row of ``compression.csv``; ``errors`` = (energy_kept, rel_error, sigma_next)."""
    kept, rel, nxt = errors
    return {"module": module, "kind": kind_of(module), "rank_in": rank_in, "rank": rank,
            "energy_kept": kept, "rel_error": rel, "sigma_next": nxt, "params_in": params_in,
            "params_out": params_out, "saved_rel_error": saved_rel_error}


def totals(rows: Sequence[dict[str, Any]], energies: Sequence[float] | None = None) -> dict[str, Any]:
    """The totals line: modules, parameters in and out, and the energy-weighted error
    √(Σ ‖ΔW − ΔW_k‖²/Σ ‖ΔW‖²) over every module (``energies``: each module's ‖ΔW‖²_F; without
    them the modules weigh equally).

    >>> a, b = row("a", 2, 1, (0.75, 0.5, 0.5), 8, 4, 0.5), row("b", 2, 2, (1.0, 0.0, 0.0), 8, 8, 0.0)
    >>> t = totals([a, b], [4.0, 12.0])
    >>> t["rel_error"], t["energy_kept"]
    (0.25, 0.9375)
    """
    w = list(energies) if energies is not None else [1.0] * len(rows)
    total = sum(w)
    tail = sum(wi * r["rel_error"] ** 2 for wi, r in zip(w, rows, strict=True))
    saved = sum(wi * r["saved_rel_error"] ** 2 for wi, r in zip(w, rows, strict=True))
    kept = sum(wi * r["energy_kept"] for wi, r in zip(w, rows, strict=True))
    return {"modules": len(rows), "params_in": sum(r["params_in"] for r in rows),
            "params_out": sum(r["params_out"] for r in rows),
            "energy_kept": kept / total if total else 1.0,
            "rel_error": math.sqrt(tail / total) if total else 0.0,
            "saved_rel_error": math.sqrt(saved / total) if total else 0.0}


def fmt_totals(t: dict[str, Any]) -> str:
    """The totals as one line of text."""
    ratio = t["params_out"] / t["params_in"] if t["params_in"] else math.nan
    return (f"total: {t['modules']} modules, {t['params_in']:,} → {t['params_out']:,} parameters "
            f"({fmt_number(ratio)}×), energy kept {fmt_number(t['energy_kept'])}, "
            f"energy-weighted rel_error {fmt_number(t['rel_error'])} "
            f"(saved {fmt_number(t['saved_rel_error'])})")


def printable(rows: list[dict[str, Any]], tot: dict[str, Any],
              notes: Sequence[str] = ()) -> Printable:
    """The error table as every command prints it: the table with its totals line, CSV (exactly
    :data:`COLUMNS`), JSON ``{"modules": [...], "totals": {...}}``."""
    frame = Rows(rows, list(COLUMNS))

    def table() -> str:
        if not rows:
            return "(no modules)\n"
        body = [[fmt_number(r[c]) for c in COLUMNS] for r in rows]
        return text_table(list(COLUMNS), body, left=2) + "\n\n" + fmt_totals(tot) + "\n"

    return Printable(frame, table, {"modules": frame.records(), "totals": tot, "notes": list(notes)})


def suggestion_printable(rows: list[dict[str, Any]]) -> Printable:
    """The rank-suggestion table (one row per module: the rank each policy gives)."""
    frame = Rows(rows, list(SUGGEST_COLUMNS))

    def table() -> str:
        body = [[fmt_number(r[c]) for c in SUGGEST_COLUMNS] for r in rows]
        return text_table(list(SUGGEST_COLUMNS), body, left=3) + "\n" if rows else "(no modules)\n"

    return Printable(frame, table)


__all__ = ["COLUMNS", "SUGGESTIONS", "SUGGEST_COLUMNS", "fmt_totals", "printable", "row",
           "suggestion_printable", "totals"]
