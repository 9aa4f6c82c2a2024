"""``deltaspec report``: the democracy report of several labelled updates of one base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from deltaspec.cli.options import analysis_options, emit, format_option, output_dir_option, take, to_options
from deltaspec.errors import one_line


@click.command("report")
@click.argument("updates", nargs=-1, required=True, metavar="NAME=PATH...")
@output_dir_option("Report folder to write (index.html, figures, CSV, summary.json). An earlier "
                   "report there is replaced; any other non-empty folder is refused.")
@click.option("--order", default=None, metavar="A,B,C",
              help="Expected order, least democratic first, as labels (default: labels "
                   "containing lora / multilora / full, i.e. LoRA < MultiLoRA ≤ full FT).")
@analysis_options(
    base={"help": "Base model folder: needed for full checkpoints; every update must pair with it."},
    k={"help": "Subspace dimension K for the similarity φ(K, K) and the heatmaps."},
    top_k={"help": "r of the rank-matched metrics (top r values of every update) [default: "
                   "the smallest rank compared; a larger one is capped at it with a warning]."},
    intruders={"help": "Also count intruder dimensions in metrics.csv (with --base; needs a "
                       "full decomposition of every base matrix)."},
    quiet={"help": "No progress bar or notes on stderr; print only the summary."})
@click.option("--module", default=None, metavar="NAME",
              help="Module of the φ(i, j) heatmaps [default: the first kind of the middle layer].")
@click.option("--with-reference", is_flag=True,
              help="Draw the shipped reference results (the demo's LoRA/MultiLoRA/full FT curves "
                   "at default settings) dashed beside yours.")
@click.option("--reference", "reference_file", default=None, metavar="FILE",
              help="Draw these reference results instead (made by deltaspec.demo.write_reference_results).")
@click.option("--svg", is_flag=True, help="Also write every figure as SVG.")
@click.option("--title", default=None, help="Title of the page.")
@format_option("the summary: table (with the verdict), json (summary.json) or csv",
               from_output=False)
def report(updates: tuple[str, ...], **kw: Any) -> None:
    """Democracy report of several updates of one base, e.g.

    \b
        deltaspec report lora=out/lora multilora=out/multilora full=out/full --base out/base --out rep

    Each NAME=PATH is a labelled update: a PEFT LoRA adapter, a MultiLoRA folder or a full
    checkpoint (with --base). Writes DIR/index.html (self-contained: open it in a browser), the
    figures as PNG, the tables as CSV and summary.json with the headline numbers and a written
    verdict: is LoRA's update the most dominated by its top direction (top-1 energy share within
    the top r values), MultiLoRA's less, full FT's least? With several runs per label
    (lora=run1,run2,…) the verdict is over seeds (Welch, Holm over pairs); with one run per method
    the page shows the module-level interval and gives no method verdict. Nulls stand beside it.
    """
    out = take(kw, "out", required=True)
    from deltaspec.demo import load_reference_results
    from deltaspec.report import parse_updates, write_report

    labelled = parse_updates(list(updates))
    reference = (load_reference_results(kw["reference_file"])
                 if kw["with_reference"] or kw["reference_file"] else None)
    order = kw["order"].split(",") if kw["order"] else None
    index = write_report(
        labelled, out, base=kw["base"], order=order, svg=kw["svg"], title=kw["title"],
        reference=reference, top_k=kw["top_k"], module=kw["module"],
        options=to_options(kw, top_k=None))
    print_summary(index, kw["fmt"], kw["quiet"])


def print_summary(index: Path, fmt: str | None, quiet: bool) -> None:
    """Print the written report's summary (table + verdict, JSON or CSV) and where it is."""
    import pandas as pd

    from deltaspec.output import Printable, fmt_number, this_rank_writes

    if not this_rank_writes():  # torchrun: rank 0 wrote the report and prints it; it may not be there yet
        return
    folder = index.parent
    summary = pd.read_csv(folder / "summary.csv")
    doc = json.loads((folder / "summary.json").read_text())

    def table() -> str:
        text = summary.to_string(index=False, formatters={c: fmt_number for c in summary.columns})
        return text + "\n\n" + click.wrap_text(doc["verdict"]["text"], width=100) + "\n"

    emit(Printable(summary, table=table, json=doc), {"fmt": fmt, "quiet": quiet})
    if not quiet:
        click.echo(one_line(f"wrote {index}"), err=True)


COMMANDS = [report]
