"""``deltaspec trajectory``: the spectra of a training run's checkpoints, step by step."""

from __future__ import annotations

from typing import Any

import click

from deltaspec.cli.options import (
    analysis_options,
    emit,
    format_option,
    output_dir_option,
    output_file_option,
    take,
    to_options,
    writable,
)
from deltaspec.errors import UsageError


def _notes(skipped: list[tuple[str, str]], notes: list[str]) -> list[str]:
    lines = [f"note: {n}" for n in notes]
    lines += [f"warning: left out (--skip-bad): {reason}" for _, reason in skipped]
    return lines


@click.command("trajectory")
@click.argument("run", nargs=-1, required=True)
@analysis_options("trajectory")
@click.option("--skip-bad", is_flag=True,
              help="Leave out checkpoints that fail to load (each is listed on stderr) instead "
                   "of stopping at the first.")
@click.option("--metric", default="normalized_entropy", show_default=True,
              help="The metric the page's figures draw against the step.")
@output_dir_option("Also write an HTML page with the figures and the table as CSV into DIR.",
                   alias=None)
@format_option()
@output_file_option()
def trajectory_cmd(run: tuple[str, ...], **kw: Any) -> None:
    """Metrics of every checkpoint of a training run, one row per (step, module).

    RUN is a run folder holding checkpoint-N sub-folders (as the transformers Trainer writes
    them), or a list of STEP=PATH items (or paths named checkpoint-N). Each checkpoint is any
    format deltaspec reads (full fine-tunes with --base). Beside every column of analyze, each
    row holds the drift: cosine_final and phi_final_left/right (φ at K to the final checkpoint),
    phi_prev_left/right (φ to the previous one) and norm_change (relative change of ‖ΔW‖_F from
    the previous checkpoint).
    """
    writable(kw["output"])
    out = take(kw, "out")
    from deltaspec.metrics.table import METRICS

    if kw["metric"] not in METRICS or METRICS[kw["metric"]].group == "pairwise":
        raise UsageError(f"--metric {kw['metric']}: not a metric of one update")
    if out is not None:
        from deltaspec.report.write import check_out_dir

        check_out_dir(out)
    from deltaspec.trajectory import points
    from deltaspec.trajectory import run as run_trajectory

    pts = points(run[0] if len(run) == 1 and "=" not in run[0] else list(run))
    result = run_trajectory(pts, kw["base"], to_options(kw), skip_bad=kw["skip_bad"])
    if out is not None:
        from deltaspec.report.trajectory import write_page

        result.table.attrs["k"] = kw["k"]
        write_page(result.table, out, run=" ".join(run), metric=kw["metric"],
                   skipped=result.skipped)
    emit(printable(result.table), kw, _notes(result.skipped, result.notes))


def printable(table: Any) -> Any:
    """CSV/JSON: every row and column; the table format: the means per step and module kind."""
    from deltaspec.output import Printable, fmt_number, text_table
    from deltaspec.report.trajectory import step_means

    def text() -> str:
        if table.empty:
            return "(no modules)\n"
        means = step_means(table)
        body = [[fmt_number(v) for v in row] for row in means.itertuples(index=False)]
        return ("mean per step and module kind (every row: --format csv or json):\n"
                + text_table(list(means.columns), body, left=0) + "\n")

    return Printable(table, table=text)


COMMANDS = [trajectory_cmd]
