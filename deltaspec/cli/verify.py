"""``deltaspec verify-merge``: does a merged checkpoint hold its adapter? (exit 0 / 1 / 2)"""

from __future__ import annotations

import sys
from typing import Any

import click

from deltaspec.cli.options import (
    analysis_options,
    emit,
    format_option,
    output_file_option,
    to_options,
    writable,
)

TABLE = ("module", "dtype", "residual", "bound", "scale", "verdict")


@click.command("verify-merge")
@click.argument("merged")
@click.option("--adapter", required=True, metavar="DIR|ID",
              help="The adapter that was merged (any adapter type deltaspec reads).")
@analysis_options("verify-merge", base={
    "required": True, "help": "The base model the adapter was merged into (folder or Hub id "
                              "org/name[@rev])."})
@format_option("the per-module verdicts")
@output_file_option("the per-module verdicts")
def verify_merge_cmd(merged: str, **kw: Any) -> None:
    """Check that MERGED (a merged model: folder, sharded checkpoint or Hub id) holds ADAPTER.

    Per module the adapter targets: the residual ‖MERGED − (BASE + ΔW)‖/‖ΔW‖ against the
    rounding bound of MERGED's dtype, and a verdict: "merged", "not merged" (MERGED equals
    BASE), "merged with scale c" (MERGED = BASE + c·ΔW: a wrong α/r), or "other". Exit status
    0 when every module holds the adapter, 1 when any does not, 2 on bad input.
    """
    writable(kw["output"])
    from deltaspec.act.verify import COLUMNS, records, verify_merge
    from deltaspec.output import Printable, Rows, fmt_number, text_table

    opts = to_options(kw)
    checks = verify_merge(merged, kw["adapter"], kw["base"], opts)
    rows = records(checks)
    failing = [c for c in checks if not c.holds]

    def table() -> str:
        body = [[c.module, c.dtype, *(fmt_number(v) for v in (c.residual, c.bound, c.scale)),
                 c.verdict] for c in checks]
        return text_table(list(TABLE), body, left=1) + "\n"

    note = (f"note: {len(failing)} of {len(checks)} modules do not hold the adapter, e.g. "
            f"{failing[0].module} ({failing[0].verdict})" if failing
            else f"note: all {len(checks)} modules hold the adapter")
    emit(Printable(Rows(rows, list(COLUMNS)), table=table), kw, [note])
    sys.exit(1 if failing else 0)


COMMANDS = [verify_merge_cmd]
