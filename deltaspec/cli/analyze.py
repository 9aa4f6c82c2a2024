"""``deltaspec analyze`` and ``deltaspec compare``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from deltaspec.output import FORMATS, render, write_atomic


def result_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options every command that prints metrics takes."""
    decorators = [
        click.option("--base", "base", default=None, metavar="DIR",
                     help="Base model folder (needed for full checkpoints and DoRA; enables "
                          "relative_norm, amplification and intruders)."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default="table",
                     show_default=True, help="How to print the results."),
        click.option("--output", "-o", default=None, metavar="FILE",
                     help="Write the results here (atomically) instead of stdout."),
        click.option("--top-k", type=click.IntRange(min=1), default=None,
                     help="Take every spectral metric over the top K singular values only."),
        click.option("--k", "k", type=click.IntRange(min=1), default=8, show_default=True,
                     help="Subspace dimension K for similarity and amplification."),
        click.option("--device", default="auto", show_default=True,
                     help="auto (CUDA when present), cpu, cuda or cuda:N."),
        click.option("--include", default=None, metavar="REGEX",
                     help="Only modules whose name matches this regular expression."),
        click.option("--no-intruders", is_flag=True,
                     help="Skip the intruder count (it needs SVDs of the base weights)."),
        click.option("--allow-modified-base", is_flag=True,
                     help="Read PiSSA/OLoRA/LoftQ/… adapters although s·B·A is not their update."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes on stderr."),
    ]
    for dec in reversed(decorators):
        f = dec(f)
    return f


def library_options(kw: dict[str, Any]) -> dict[str, Any]:
    """CLI keyword arguments → the library's ``analyze``/``compare`` options."""
    return {"top_k": kw["top_k"], "k": kw["k"], "device": kw["device"],
            "include": kw["include"], "intruders": not kw["no_intruders"],
            "allow_modified_base": kw["allow_modified_base"],
            "progress": not kw["quiet"] and sys.stderr.isatty()}


def emit(df: Any, kw: dict[str, Any]) -> None:
    """Print or write a result frame, then notes (skipped modules) on stderr."""
    text = render(df, kw["fmt"])
    if kw["output"]:
        write_atomic(kw["output"], text)
    else:
        click.echo(text, nl=False)
    if kw["quiet"]:
        return
    skipped = getattr(df, "skipped", None) or []
    if skipped:
        click.echo(f"note: {len(skipped)} tensor(s) skipped, e.g. {skipped[0][0]} "
                   f"({skipped[0][1]})", err=True)
    for side in ("a", "b"):
        only = df.attrs.get(f"only_{side}") or []
        if only:
            click.echo(f"note: {len(only)} module(s) only in {side.upper()}, e.g. {only[0]}",
                       err=True)


@click.command("analyze")
@click.argument("path")
@result_options
def analyze_cmd(path: str, **kw: Any) -> None:
    """Metrics of the update at PATH, one row per module.

    PATH is a PEFT LoRA adapter folder, a MultiLoRA folder, or a full fine-tuned checkpoint
    (then --base is required and ΔW = PATH − BASE).
    """
    from deltaspec.analyze import analyze

    emit(analyze(path, base=kw["base"], **library_options(kw)), kw)


@click.command("compare")
@click.argument("a")
@click.argument("b")
@result_options
def compare_cmd(a: str, b: str, **kw: Any) -> None:
    """Compare updates A and B module by module.

    Each side is an adapter folder, or a full checkpoint with --base. Rows hold both sides'
    metrics (_a, _b) and the pairwise ones: cosine, subspace similarity φ at K (left and right
    singular vectors), smallest principal angle. When A and B are both full checkpoints and no
    --base is given, the update analysed is ΔW = B − A.
    """
    from deltaspec.analyze import compare

    emit(compare(a, b, base=kw["base"], **library_options(kw)), kw)


COMMANDS = [analyze_cmd, compare_cmd]
