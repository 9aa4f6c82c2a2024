"""``deltaspec report``: the democracy report of several labelled updates of one base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from deltaspec.output import FORMATS


@click.command("report")
@click.argument("updates", nargs=-1, required=True, metavar="NAME=PATH...")
@click.option("--base", default=None, metavar="DIR",
              help="Base model folder: needed for full checkpoints; every update must pair with it.")
@click.option("--out", "-o", "out", required=True, metavar="DIR",
              help="Report folder to write (index.html, figures, CSV, summary.json). An earlier "
                   "report there is replaced; any other non-empty folder is refused.")
@click.option("--order", default=None, metavar="A,B,C",
              help="Expected ascending order of entropy, as labels (default: labels containing "
                   "lora / multilora / full, i.e. LoRA < MultiLoRA ≤ full FT).")
@click.option("--k", "k", type=click.IntRange(min=1), default=8, show_default=True,
              help="Subspace dimension K for the similarity φ(K, K) and the heatmaps.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="K of the fair entropy (top K values of every update) [default: the smallest "
                   "rank compared].")
@click.option("--module", default=None, metavar="NAME",
              help="Module of the φ(i, j) heatmaps [default: the first kind of the middle layer].")
@click.option("--include", default=None, metavar="REGEX",
              help="Only modules whose name matches this regular expression.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--intruders", is_flag=True,
              help="Also count intruder dimensions in metrics.csv (needs SVDs of the base weights).")
@click.option("--with-reference", is_flag=True,
              help="Draw the shipped reference results (the demo's LoRA/MultiLoRA/full FT curves "
                   "at default settings) dashed beside yours.")
@click.option("--reference", "reference_file", default=None, metavar="FILE",
              help="Draw these reference results instead (made by deltaspec.demo.write_reference_results).")
@click.option("--svg", is_flag=True, help="Also write every figure as SVG.")
@click.option("--title", default=None, help="Title of the page.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
              help="How to print the summary: table (with the verdict), json (summary.json) or csv.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the summary.")
def report(updates: tuple[str, ...], **kw: Any) -> None:
    """Democracy report of several updates of one base, e.g.

    \b
        deltaspec report lora=out/lora multilora=out/multilora full=out/full --base out/base --out rep

    Each NAME=PATH is a labelled update: a PEFT LoRA adapter, a MultiLoRA folder or a full
    checkpoint (with --base). Writes DIR/index.html (self-contained: open it in a browser), the
    figures as PNG, the tables as CSV and summary.json with the headline numbers and a written
    verdict: does the mean normalised singular-value entropy order LoRA < MultiLoRA ≤ full FT?
    """
    from deltaspec.demo import load_reference_results
    from deltaspec.report import parse_updates, write_report

    labelled = parse_updates(list(updates))
    reference = (load_reference_results(kw["reference_file"])
                 if kw["with_reference"] or kw["reference_file"] else None)
    order = kw["order"].split(",") if kw["order"] else None
    index = write_report(
        labelled, kw["out"], base=kw["base"], order=order, svg=kw["svg"], title=kw["title"],
        reference=reference,
        k=kw["k"], top_k=kw["top_k"], module=kw["module"], include=kw["include"],
        device=kw["device"], intruders=kw["intruders"], progress=not kw["quiet"])
    print_summary(index, kw["fmt"], kw["quiet"])


def print_summary(index: Path, fmt: str, quiet: bool) -> None:
    """Print the written report's summary (table + verdict, JSON or CSV) and where it is."""
    folder = index.parent
    if fmt == "json":
        click.echo((folder / "summary.json").read_text(), nl=False)
    elif fmt == "csv":
        click.echo((folder / "summary.csv").read_text(), nl=False)
    else:
        import pandas as pd

        summary = pd.read_csv(folder / "summary.csv")
        doc = json.loads((folder / "summary.json").read_text())
        click.echo(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        click.echo("\n" + click.wrap_text(doc["verdict"]["text"], width=100))
    if not quiet:
        click.echo(f"wrote {index}", err=True)


COMMANDS = [report]
