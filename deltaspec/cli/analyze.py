"""``deltaspec analyze`` and ``deltaspec compare``."""

from __future__ import annotations

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


def result_notes(skipped: list[tuple[str, str]], only_a: list[str], only_b: list[str],
                 loader_notes: list[str] | None = None) -> list[str]:
    """The stderr notes of a result: the loaders' remarks, skipped tensors, one-sided modules."""
    notes = [f"note: {n}" for n in loader_notes or []]
    if skipped:
        notes.append(f"note: {len(skipped)} tensor(s) skipped, e.g. {skipped[0][0]} "
                     f"({skipped[0][1]})")
    for side, only in (("A", only_a), ("B", only_b)):
        if only:
            notes.append(f"note: {len(only)} module(s) only in {side}, e.g. {only[0]}")
    return notes


def _result_options(f: Any) -> Any:
    return analysis_options()(format_option()(output_file_option()(f)))


@click.command("analyze")
@click.argument("path")
@_result_options
def analyze_cmd(path: str, **kw: Any) -> None:
    """Metrics of the update at PATH, one row per module.

    PATH is a PEFT LoRA adapter folder, a MultiLoRA folder, or a full fine-tuned checkpoint
    (then --base is required and ΔW = PATH − BASE) — or the Hugging Face Hub id org/name[@rev]
    of one: from the local cache, else downloading only its configs and weights (HF_HOME,
    HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN apply).
    """
    writable(kw["output"])
    from deltaspec.lite import analyze_rows

    opts = to_options(kw)
    rows = analyze_rows(path, kw["base"], opts)  # a plain LoRA adapter: without torch or pandas
    if rows is not None:
        from deltaspec.metrics import untrained_note

        note = untrained_note(rows.rows)
        emit(rows, kw, [f"note: {note}"] if note else None)
        return
    from deltaspec.analyze import run_paths

    result = run_paths(path, None, kw["base"], opts)
    emit(result.table, kw, result_notes(result.skipped, [], [], result.notes))


@click.command("compare")
@click.argument("a")
@click.argument("b")
@_result_options
def compare_cmd(a: str, b: str, **kw: Any) -> None:
    """Compare updates A and B module by module.

    Each side is an adapter folder, or a full checkpoint with --base (folders or Hub ids
    org/name[@rev]). Rows hold both sides'
    metrics (_a, _b) and the pairwise ones: cosine, subspace similarity φ at K (left and right
    singular vectors), smallest principal angle. When A and B are both full checkpoints and no
    --base is given, the update analysed is ΔW = B − A.
    """
    writable(kw["output"])
    from deltaspec.analyze import run_paths

    result = run_paths(a, b, kw["base"], to_options(kw))
    emit(result.table, kw, result_notes(result.skipped, result.only_a, result.only_b,
                                          result.notes))


COMMANDS = [analyze_cmd, compare_cmd]
