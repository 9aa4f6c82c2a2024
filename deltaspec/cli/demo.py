"""``deltaspec demo``: the whole chain on the embedded default, on the CPU, in minutes."""

from __future__ import annotations

import json
import time

import click

from deltaspec.cli.options import DEVICE, progress
from deltaspec.demo import DEFAULT_SEEDS


@click.command("demo")
@click.option("--out", "out", default="deltaspec-demo", show_default=True, metavar="DIR",
              help="Folder for the checkpoints and the report (DIR/report/index.html).")
@click.option("--quick", is_flag=True, help="A much shorter run (≤ 2 minutes) for smoke tests.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the base and data, and of the first fine-tuning run.")
@click.option("--seeds", type=int, default=DEFAULT_SEEDS, show_default=True,
              help="Runs per method (seeds SEED, SEED+1, …): the verdict is over seeds; with 1 "
                   "the report gives no method verdict.")
@click.option("--cache-dir", default=None, metavar="DIR",
              help="Cache of the pretrained base (default $DELTASPEC_CACHE or ~/.cache/deltaspec).")
@click.option("--no-reference", is_flag=True,
              help="Do not draw the shipped reference curves (a --quick run never gets them).")
@click.option("--threads", type=int, default=None,
              help="CPU threads, any count [default: 1]. Same seed and thread count: "
                   "bit-identical results.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto (cuda when present), cpu, cuda or cuda:N.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines or bars on stderr.")
def demo(out: str, quick: bool, seed: int, seeds: int, cache_dir: str | None, no_reference: bool,
         threads: int | None, device: str, quiet: bool) -> None:
    """Pretrain a tiny base, fine-tune it with LoRA, MultiLoRA and full fine-tuning on a
    synthetic multi-task mixture, then write the democracy report comparing the three updates.

    Runs on the CPU with nothing downloaded: a few minutes on 2 idle cores for 3 seeds of the
    small reference model (--quick: about a minute). Progress bars appear only when stderr is a
    terminal, never with -q.
    """
    from deltaspec.cli.train import resolve_device
    from deltaspec.demo import run_demo
    from deltaspec.errors import UsageError

    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {threads})")
    start = time.perf_counter()

    def log(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.perf_counter() - start:6.1f}s] {msg}", err=True)

    index = run_demo(out, quick=quick, seed=seed, seeds=seeds, cache_dir=cache_dir,
                     log=None if quiet else log,
                     device=resolve_device(device), threads=threads,
                     with_reference=not no_reference, progress=progress({"quiet": quiet}))
    summary = json.loads((index.parent / "summary.json").read_text())
    click.echo(summary.get("verdict", {}).get("text", "") if isinstance(summary.get("verdict"), dict)
               else str(summary.get("verdict", "")))
    click.echo(f"report: {index}")


COMMANDS = [demo]
