"""``deltaspec zoo``: similarity, clusters and a shared basis of many updates of one base."""

from __future__ import annotations

from typing import Any

import click

from deltaspec.cli.options import analysis_options, emit, format_option, output_dir_option, take, to_options
from deltaspec.errors import UsageError, one_line


@click.command("zoo")
@click.argument("updates", nargs=-1, required=True, metavar="PATH|NAME=PATH...")
@output_dir_option("Folder to write (index.html, pairs.csv, matrix.csv, clusters.csv, basis.csv, "
                   "modules.csv, zoo.json, figures). An earlier zoo folder there is replaced; any "
                   "other non-empty folder is refused.", alias=None)
@analysis_options(
    "zoo",
    base={"help": "Base model folder or Hub id: needed for full fine-tunes (every update must "
                  "pair with it)."},
    k={"help": "Subspace dimension K of the similarity φ(K, K) and the principal angles "
               "[default: 8]."})
@click.option("--title", default=None, help="Title of the page.")
@format_option("the summary: table (groups and closest pairs), json (zoo.json) or csv "
               "(clusters)", from_output=False)
def zoo_cmd(updates: tuple[str, ...], **kw: Any) -> None:
    """Many updates of one base at once, e.g.

    \b
        deltaspec zoo adapters/* --out zoo
        deltaspec zoo math=runs/math code=runs/code org/chat-lora --k 8 --out zoo

    Each argument is an update: a folder (PEFT adapter of any kind, MultiLoRA, a full fine-tune
    with --base), a Hub id, or NAME=PATH to label it (else it is labelled by its last path
    components). Per module, every pair gets the exact, gauge-invariant cosine, the subspace
    similarity φ(K, K) of the top-K singular vectors with its chance level K/m, and the smallest
    principal angle; the collection gets an N×N whole-model matrix, hierarchical clusters with
    a suggested number of groups, and a shared-basis curve per module kind (how many common
    directions keep 90 % / 99 % of the energy of all updates). Writes DIR/index.html
    (self-contained) beside tidy CSV tables and zoo.json.
    """
    out = take(kw, "out", required=True)
    if len(updates) < 2:
        raise UsageError(f"a collection needs at least two updates (got {len(updates)})")
    from deltaspec.collection import run
    from deltaspec.collection.sources import parse_sources
    from deltaspec.collection.write import check_zoo_dir, write

    labelled = parse_sources(list(updates))
    check_zoo_dir(out)  # fail before the analysis, not after it
    result = run(labelled, kw["base"], to_options(kw))
    index = write(result, out, base=kw["base"], title=kw["title"])
    print_summary(result, index, kw)


def print_summary(result: Any, index: Any, kw: dict[str, Any]) -> None:
    """Groups and the closest pairs (table), zoo.json (json) or the clusters (csv)."""
    import json

    from deltaspec.collection.write import closest_pairs
    from deltaspec.output import Printable, fmt_number, this_rank_writes

    if not this_rank_writes():
        return

    def table() -> str:
        pairs = closest_pairs(result, 5)
        lines = [f"{len(result.labels)} updates, {result.modules.shape[0]} modules, K={result.k}: "
                 f"{result.tree.groups} suggested group(s)",
                 *(f"  group {g}: {', '.join(part['label'])}"
                   for g, part in result.clusters.groupby("group", sort=True)),
                 "closest pairs (whole-model cosine):",
                 *(f"  {r.a} ~ {r.b}: {fmt_number(r.cosine)}" for r in pairs.itertuples())]
        return "\n".join(lines) + "\n"

    doc = json.loads((index.parent / "zoo.json").read_text())
    emit(Printable(result.clusters, table=table, json=doc),
         {"fmt": kw["fmt"], "quiet": kw["quiet"]}, result.notes)
    if not kw["quiet"]:
        click.echo(one_line(f"wrote {index}"), err=True)


COMMANDS = [zoo_cmd]
