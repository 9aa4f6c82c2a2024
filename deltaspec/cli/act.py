"""``deltaspec compress`` and ``deltaspec extract``: act on the spectrum (:mod:`deltaspec.act`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from deltaspec.cli.options import analysis_options, emit, format_option, output_dir_option, to_options
from deltaspec.errors import UsageError

_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _act_options(command: str,
                 base_help: str | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The command's own options, then the shared load options (those whose ``commands`` name
    it: :data:`deltaspec.options.LOADING`; the spectral-metric ones do not apply here)."""

    def deco(f: Callable[..., Any]) -> Callable[..., Any]:
        own: list[Callable[[Any], Any]] = [
            click.option("--rank", "rank", default="gd", show_default=True, metavar="POLICY",
                         help="Rank per module: an integer k (16), an energy fraction τ in (0, 1] "
                              "(0.9 or energy:0.9, PEFT's rule), gd (Gavish–Donoho optimal hard "
                              "threshold) or mp (Marchenko–Pastur bulk edge)."),
            click.option("--min-rank", type=click.IntRange(min=1), default=None,
                         help="Keep at least this many directions (below ΔW's rank)."),
            click.option("--max-rank", type=click.IntRange(min=1), default=None,
                         help="Keep at most this many directions."),
            click.option("--dtype", type=click.Choice(_DTYPES), default=None,
                         help="dtype of the written factors [default: the input's]."),
            click.option("--overwrite", is_flag=True,
                         help="Replace an earlier result in --out (a folder holding an adapter "
                              "or compression.csv)."),
            click.option("--dry-run", is_flag=True,
                         help="Print the error table; write nothing."),
            click.option("--suggest", is_flag=True,
                         help="Print the rank each policy gives per module (energy 0.9, 0.99, gd, "
                              "mp, and --rank's); write nothing."),
            output_dir_option("Write the PEFT LoRA adapter and compression.csv to this folder "
                              "(it must not exist or be empty)", alias=None),
            format_option("the error table", from_output=False),
        ]
        for dec in reversed(own):
            f = dec(f)
        shared = analysis_options(command, **({"base": {"help": base_help}} if base_help else {}))
        return shared(f)

    return deco


def _run(what: str, source: str, kw: dict[str, Any]) -> None:
    from deltaspec.act.run import act, finish, load_deltas, source_config
    from deltaspec.act.writer import check_out
    from deltaspec.metrics.ranks import parse_policy

    policy = parse_policy(kw["rank"], kw["min_rank"], kw["max_rank"])
    writes = not (kw["dry_run"] or kw["suggest"])
    if writes and not kw["out"]:
        raise UsageError(f"{what}: missing --out DIR (or --dry-run / --suggest to write nothing)")
    if writes:
        check_out(kw["out"], kw["overwrite"])
    opts = to_options(kw)
    if kw["suggest"]:
        from deltaspec.act.suggest import suggestion_rows
        from deltaspec.act.table import suggestion_printable

        rows, notes = suggestion_rows(source, kw["base"], policy, opts)
        emit(suggestion_printable(rows), kw, [f"note: {n}" for n in notes])
        return
    deltas = load_deltas(source, kw["base"], opts)
    if what == "compress" and deltas.format == "full":
        raise UsageError(f"{source}: a full checkpoint, not an adapter: use deltaspec extract "
                         f"{source} --base BASE")
    if what == "extract" and deltas.format != "full":
        raise UsageError(f"{source}: an adapter ({deltas.format}), not a full checkpoint: use "
                         f"deltaspec compress {source}")
    acted = act(deltas, policy, opts, kw["dtype"])
    if writes:
        finish(acted, kw["out"], source_config(source if what == "compress" else None,
                                               kw["base"]), kw["overwrite"])
    emit(acted.printable(), kw, [f"note: {n}" for n in acted.notes])


@click.command("compress")
@click.argument("adapter")
@_act_options("compress")
def compress_cmd(adapter: str, **kw: Any) -> None:
    """Compress ADAPTER to a PEFT LoRA of the ranks --rank gives, with the error per module.

    ADAPTER is any adapter deltaspec reads whose ΔW does not depend on the input (LoRA, rsLoRA,
    rank/alpha patterns, MultiLoRA, AdaLoRA, VeRA, LoHa, LoKr, FourierFT; DoRA, IA³, OFT and
    BOFT with --base). The truncation is exact (factored SVD; never dense for factored inputs).
    --out gets adapter_config.json (ranks in rank_pattern, α = r: ΔW = B·A), the factors in
    adapter_model.safetensors, and compression.csv (rank, energy kept, exact relative error,
    the error of the factors as saved). The table is printed too.
    """
    _run("compress", adapter, kw)


@click.command("extract")
@click.argument("finetuned")
@_act_options("extract", base_help="The base model FINETUNED was fine-tuned from (folder or Hub id "
                        "org/name[@rev]) [required].")
def extract_cmd(finetuned: str, **kw: Any) -> None:
    """Extract a PEFT LoRA from the full fine-tune FINETUNED: ΔW = FINETUNED − BASE, truncated
    per module to the rank --rank gives, one module at a time (exact top-k by the spectral
    engine; the error is computed exactly). Embeddings and lm_head are not written (a note
    says so); --out as for compress.
    """
    if not kw.get("base"):
        raise UsageError("extract: missing --base BASE (the model FINETUNED was tuned from)")
    _run("extract", finetuned, kw)


COMMANDS = [compress_cmd, extract_cmd]
