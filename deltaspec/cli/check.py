"""``deltaspec snapshot`` and ``deltaspec check``: a CI gate on spectral metrics.

Exit status of ``check``: 0 every check passed, 1 a regression, 2 a usage or input error.
Renderers here (table, JSON, CSV, JUnit XML, GitHub Actions annotations) only format the
:class:`deltaspec.gate.check.Outcome`; the comparison itself lives in :mod:`deltaspec.gate.check`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import click

from deltaspec.errors import UsageError
from deltaspec.gate.check import Outcome, describe, to_dict
from deltaspec.gate.snapshot import write_shared
from deltaspec.names import kind_of

CHECK_FORMATS = ("table", "json", "csv")
MAX_ANNOTATIONS = 50  # GitHub shows only the first few per step; the rest go into one summary


def render(outcome: Outcome, fmt: str, verbose: bool = False) -> str:
    """The outcome as ``table`` (failures first), ``json`` (everything) or ``csv`` (one row per
    check)."""
    if fmt == "json":
        return json.dumps(to_dict(outcome), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["module", "metric", "baseline", "current", "limit", "passed", "message"])
        for c in outcome.checks:
            w.writerow([c.module, c.metric, "" if c.baseline is None else c.baseline,
                        "" if c.current is None else c.current, c.limit, c.passed, c.message])
        return buf.getvalue()
    return describe(outcome, verbose)


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


def _writable(path: str | None, option: str) -> None:
    if path and not (Path(path).parent if str(Path(path).parent) else Path(".")).is_dir():
        raise UsageError(f"{option} {path}: folder {Path(path).parent} does not exist")


@click.command("snapshot")
@click.argument("path")
@click.option("--out", "-o", "out", required=True, metavar="FILE",
              help="The baseline file to write (JSON, written atomically).")
@click.option("--base", default=None, metavar="DIR",
              help="Base model folder (full checkpoints, DoRA; adds base-relative metrics).")
@click.option("--k", "k", type=click.IntRange(min=1), default=8, show_default=True,
              help="Top-K singular vectors kept per side for the subspace check.")
@click.option("--top-k", type=click.IntRange(min=1), default=None,
              help="Take every spectral metric over the top K singular values only.")
@click.option("--sketch", type=click.IntRange(min=0), default=0, show_default=True,
              help="0 stores the top-K vectors (float16). D > 0 (a multiple of 8, e.g. 256) "
                   "stores a D-row random sketch of each side instead: 20× smaller on 7B "
                   "models, φ within about ±0.05.")
@click.option("--include", default=None, metavar="REGEX",
              help="Only modules whose name matches this regular expression.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--no-intruders", is_flag=True, help="Skip the intruder count (with --base).")
@click.option("--allow-modified-base", is_flag=True,
              help="Read PiSSA/OLoRA/LoftQ/… adapters although s·B·A is not their update.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or notes on stderr.")
def snapshot_cmd(path: str, out: str, **kw: Any) -> None:
    """Record the per-module metrics and top-K subspaces of the update at PATH as a baseline
    for `deltaspec check`.

    PATH is a PEFT LoRA adapter, a MultiLoRA folder, or a full checkpoint (with --base).
    """
    from deltaspec.gate.snapshot import take_snapshot, write_baseline

    _writable(out, "--out")
    b = take_snapshot(path, kw["base"], k=kw["k"], top_k=kw["top_k"], sketch=kw["sketch"],
                      include=kw["include"], intruders=not kw["no_intruders"],
                      device=kw["device"], progress=not kw["quiet"],
                      allow_modified_base=kw["allow_modified_base"])
    write_baseline(b, out)
    if not kw["quiet"]:
        size = os.path.getsize(out)
        click.echo(f"wrote {out}: {len(b.modules)} modules, k={b.k}, {size / 1e6:.2f} MB", err=True)


@click.command("check")
@click.argument("path")
@click.option("--baseline", "-b", required=True, metavar="FILE",
              help="A baseline written by `deltaspec snapshot`.")
@click.option("--base", default=None, metavar="DIR",
              help="Base model folder (needed when the baseline was made with one).")
@click.option("--rules", "-r", default=None, metavar="FILE",
              help="Tolerances, bounds and subspace bounds (TOML, or JSON); defaults otherwise.")
@click.option("--format", "fmt", type=click.Choice(CHECK_FORMATS), default="table",
              show_default=True, help="How to print the result.")
@click.option("--output", "-o", default=None, metavar="FILE",
              help="Write the result here (atomically) instead of stdout.")
@click.option("--junit", default=None, metavar="FILE",
              help="Also write JUnit XML (one testcase per module) for CI test reports; its "
                   "folder is created when missing.")
@click.option("--device", default="auto", show_default=True,
              help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--allow-modified-base", is_flag=True,
              help="Read PiSSA/OLoRA/LoftQ/… adapters although s·B·A is not their update.")
@click.option("-v", "--verbose", is_flag=True, help="List the passing checks too.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar on stderr.")
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
    from deltaspec.gate.check import load_rules, read_baseline, run_check

    _writable(kw["output"], "--output")
    rules = load_rules(kw["rules"])
    baseline = read_baseline(kw["baseline"])
    if kw["junit"]:  # like pytest --junitxml: a report folder is created when missing
        Path(kw["junit"]).resolve().parent.mkdir(parents=True, exist_ok=True)
    outcome = run_check(path, baseline, rules, base=kw["base"], device=kw["device"],
                        progress=not kw["quiet"], allow_modified_base=kw["allow_modified_base"])
    text = render(outcome, kw["fmt"], kw["verbose"])
    if kw["junit"]:
        write_shared(kw["junit"], junit_xml(outcome))
    if kw["output"]:
        write_shared(kw["output"], text)
    else:
        click.echo(text, nl=False)
    if os.environ.get("GITHUB_ACTIONS") == "true":
        to_stderr = kw["fmt"] != "table" and not kw["output"]  # keep JSON/CSV on stdout clean
        for line in github_annotations(outcome):
            click.echo(line, err=to_stderr)
    ctx.exit(0 if outcome.ok else 1)


COMMANDS = [snapshot_cmd, check_cmd]
