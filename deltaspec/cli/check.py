"""``deltaspec snapshot`` and ``deltaspec check``: a CI gate on spectral metrics.

Exit status of ``check``: 0 every check passed, 1 a regression, 2 a usage or input error.
Renderers here (table, JSON, CSV, JUnit XML, GitHub Actions annotations) only format the
:class:`deltaspec.gate.check.Outcome`; the comparison itself lives in :mod:`deltaspec.gate.check`.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from deltaspec.atomic import check_target
from deltaspec.cli.options import (
    analysis_options,
    emit,
    format_option,
    output_file_option,
    take,
    to_options,
    writable,
)
from deltaspec.errors import one_line
from deltaspec.names import kind_of
from deltaspec.options import CORE_ONLY, FIELDS
from deltaspec.world import this_rank_writes

if TYPE_CHECKING:
    from deltaspec.gate.check import Outcome
    from deltaspec.output import Printable

MAX_ANNOTATIONS = 50  # GitHub shows only the first few per step; the rest go into one summary


CHECK_COLUMNS = ["module", "metric", "baseline", "current", "limit", "passed", "message"]


def printable(outcome: Outcome, verbose: bool = False) -> Printable:
    """The outcome for the renderer table: ``table`` (failures first), ``json`` (everything),
    ``csv`` (one row per check)."""
    import pandas as pd

    from deltaspec.gate.check import describe, to_dict
    from deltaspec.output import Printable

    rows = [[c.module, c.metric, c.baseline, c.current, c.limit, c.passed, c.message]
            for c in outcome.checks]
    frame = pd.DataFrame(rows, columns=CHECK_COLUMNS, dtype=object)
    return Printable(frame, table=lambda: describe(outcome, verbose), json=to_dict(outcome))


def junit_xml(outcome: Outcome) -> str:
    """JUnit XML: one testcase per module, a ``failure`` naming every failed metric; modules
    not in the baseline are ``skipped`` testcases (failures with ``fail_on_new``)."""
    per_module = outcome.by_module()
    unchecked = [n for n in outcome.new if n not in per_module]
    failed = sum(1 for cs in per_module.values() if any(not c.passed for c in cs))
    counts = {"tests": str(len(per_module) + len(unchecked)), "failures": str(failed),
              "errors": "0", "skipped": str(len(unchecked))}
    root = ET.Element("testsuites", {"name": "deltaspec check", **counts})
    suite = ET.SubElement(root, "testsuite", {"name": "deltaspec check", **counts})
    props = ET.SubElement(suite, "properties")
    for key, value in (("baseline", outcome.baseline), ("source", outcome.source)):
        ET.SubElement(props, "property", {"name": key, "value": str(value)})
    for name, cs in per_module.items():
        case = ET.SubElement(suite, "testcase", {"classname": f"deltaspec.gate.check.{kind_of(name)}",
                                                 "name": name, "time": "0"})
        bad = [c for c in cs if not c.passed]
        if bad:
            fail = ET.SubElement(case, "failure", {
                "message": "; ".join(c.message for c in bad), "type": "SpectralRegression"})
            fail.text = "\n".join(f"{c.metric}: baseline {c.baseline}, current {c.current}, "
                                  f"limit {c.limit}" for c in bad)
    for name in unchecked:
        case = ET.SubElement(suite, "testcase", {"classname": f"deltaspec.gate.check.{kind_of(name)}",
                                                 "name": name, "time": "0"})
        ET.SubElement(case, "skipped", {"message": "not in the baseline"})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _escape(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_annotations(outcome: Outcome) -> list[str]:
    """``::error`` lines (one per failed check) and ``::warning`` lines (new modules)."""
    title = "title=deltaspec check"
    fails = outcome.failures
    lines = [f"::error {title}::{_escape(f'module {c.module}: {c.message}')}"
             for c in fails[:MAX_ANNOTATIONS]]
    if len(fails) > MAX_ANNOTATIONS:
        lines.append(f"::error {title}::{len(fails) - MAX_ANNOTATIONS} more failed checks "
                     "(see the check table)")
    lines += [f"::warning {title}::{_escape(f'module {n}: not in the baseline, not checked')}"
              for n in outcome.new if n not in outcome.modules][:MAX_ANNOTATIONS]
    lines += [f"::warning {title}::{_escape(n)}" for n in outcome.notes]
    return lines


def _writable(path: str | None, option: str, parents: bool = False) -> None:
    if path:
        check_target(path, option, parents)


@click.command("snapshot")
@click.argument("path")
@output_file_option("the baseline (JSON)", required=True, alias="--out")
@analysis_options(k={"help": "Subspace dimension K: the top-K singular vectors kept per side for "
                             "the subspace check (and amplification's K)."})
@click.option("--sketch", type=click.IntRange(min=0), default=0, show_default=True,
              help="0 stores the top-K vectors (float16). D > 0 (a multiple of 8, e.g. 256) "
                   "stores a D-row random sketch of each side instead: 20× smaller on 7B "
                   "models, φ within about ±0.05.")
def snapshot_cmd(path: str, **kw: Any) -> None:
    """Record the per-module metrics and top-K subspaces of the update at PATH as a baseline
    for `deltaspec check`.

    PATH is a PEFT LoRA adapter, a MultiLoRA folder, or a full checkpoint (with --base).
    """
    out = take(kw, "output", required=True)
    writable(out)
    from deltaspec.gate.snapshot import take_snapshot, write_baseline

    b = take_snapshot(path, kw["base"], sketch=kw["sketch"], options=to_options(kw))
    write_baseline(b, out)
    if not kw["quiet"] and this_rank_writes():  # other ranks wrote nothing: no file to measure
        size = os.path.getsize(out)
        click.echo(one_line(f"wrote {out}: {len(b.modules)} modules, k={b.k}, {size / 1e6:.2f} MB"),
                   err=True)


_FROM_BASELINE = " [default: the baseline's]"


@click.command("check")
@click.argument("path")
@click.option("--baseline", "-b", required=True, metavar="FILE",
              help="A baseline written by `deltaspec snapshot`.")
@click.option("--rules", "-r", default=None, metavar="FILE",
              help="Tolerances, bounds and subspace bounds (TOML, or JSON); defaults otherwise.")
@format_option("the result")
@output_file_option("the result")
@click.option("--junit", default=None, metavar="FILE",
              help="Also write JUnit XML (one testcase per module) for CI test reports; its "
                   "folder is created when missing.")
@analysis_options(
    base={"help": "Base model folder (needed when the baseline was made with one)."},
    k={"default": None, "show_default": False,
       "help": "Subspace dimension K; must be the baseline's." + _FROM_BASELINE},
    top_k={"help": "Spectral metrics over the top K values; must be the baseline's."
                   + _FROM_BASELINE},
    include={"help": "Only check modules whose name matches this regular expression; the "
                     "others are reported as ignored." + _FROM_BASELINE},
    intruders={"show_default": False,
               "help": "Count intruder dimensions (with --base) [default: off, unless the "
                       "rules check intruders]."},
    quiet={"help": "No progress bar or notes on stderr."})
@click.option("-v", "--verbose", is_flag=True, help="List the passing checks too.")
@click.pass_context
def check_cmd(ctx: click.Context, path: str, **kw: Any) -> None:
    """Compare the update at PATH with a baseline; fail on spectral regressions.

    Each module's metrics must stay within tolerances of the baseline's (defaults:
    normalized_entropy may drop by at most 0.05 + 5%, top1_share rise by at most 0.15 + 30%,
    fro_norm change by at most 35%) and its top-K singular subspaces must keep φ ≥ 0.5 against
    the baseline's; --rules changes any of it. Missing modules and shape changes fail.
    Exit status: 0 all passed, 1 a regression, 2 a usage or input error.
    With GITHUB_ACTIONS=true, failures are also printed as ::error annotations.
    """
    _writable(kw["output"], "--output")
    _writable(kw["junit"], "--junit", parents=True)
    from deltaspec.gate.check import FROM_BASELINE, load_rules, read_baseline, run_check
    from deltaspec.output import format_for

    rules = load_rules(kw["rules"])
    baseline = read_baseline(kw["baseline"])
    opts = to_options(kw)  # every shared option; K, top-K, include, intruders: the baseline's unless given
    changes = {f: getattr(opts, f) for f in FIELDS if f not in CORE_ONLY and (
        f not in FROM_BASELINE or ctx.get_parameter_source(f) is not ParameterSource.DEFAULT)}
    outcome = run_check(path, baseline, rules, base=kw["base"], **changes)
    if kw["junit"]:  # like pytest --junitxml: a missing folder is created, once it is written
        from deltaspec.output import write_atomic

        write_atomic(kw["junit"], junit_xml(outcome), parents=True)
    emit(printable(outcome, kw["verbose"]), kw | {"quiet": True})
    if os.environ.get("GITHUB_ACTIONS") == "true":
        fmt = format_for(kw["fmt"], kw["output"])
        to_stderr = fmt != "table" and not kw["output"]  # keep JSON/CSV on stdout clean
        for line in github_annotations(outcome):
            click.echo(line, err=to_stderr)
    ctx.exit(0 if outcome.ok else 1)


COMMANDS = [snapshot_cmd, check_cmd]
