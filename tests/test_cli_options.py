"""The command line's shared options: the same names and defaults in every analysing command,
-o/--output FILE and --out DIR, the format taken from the output's extension, intruders opt-in,
the table's hint, and a --help that imports no torch."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from deltaspec.cli import main

ANALYSING = ("analyze", "compare", "report", "snapshot", "check")
SHARED = ("--include", "--top-k", "--k", "--device", "--intruders / --no-intruders", "-q",
          "--base", "--allow-modified-base")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"GITHUB_ACTIONS": "false"})


@pytest.mark.parametrize("command", ANALYSING)
def test_every_analysing_command_lists_the_shared_options(command):
    res = run(command, "--help")
    assert res.exit_code == 0, res.output
    for opt in SHARED:
        assert opt in res.output, f"{command} --help lacks {opt}"
    writes = "--out DIR" if command == "report" else "-o, --output FILE"
    assert writes in res.output
    if command != "snapshot":
        assert "--format [table|json|csv]" in res.output


@pytest.mark.parametrize("suffix,kind", [(".json", "json"), (".CSV", "csv"), (".txt", "table")])
def test_output_format_comes_from_the_extension(llama_lora, tmp_path, suffix, kind):
    adapter, _ = llama_lora
    out = tmp_path / f"metrics{suffix}"
    res = run("analyze", adapter, "-o", out, "-q", "--include", "q_proj")
    assert res.exit_code == 0, res.output
    text = out.read_text()
    if kind == "json":
        assert {r["kind"] for r in json.loads(text)} == {"q_proj"}
    elif kind == "csv":
        assert set(pd.read_csv(io.StringIO(text))["kind"]) == {"q_proj"}
    else:
        assert "normalized_entropy" in text and "mean per module kind" in text
    forced = run("analyze", adapter, "-o", out, "-q", "--format", "json", "--include", "q_proj")
    assert forced.exit_code == 0 and json.loads(out.read_text())  # --format wins
    missing = run("analyze", adapter, "-o", tmp_path / "nope" / "m.json")
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_table_hints_at_the_hidden_columns_on_stderr(llama_lora):
    adapter, _ = llama_lora
    res = run("analyze", adapter, "--include", "q_proj")
    assert res.exit_code == 0
    assert "--format csv" in res.stderr and "--format csv" not in res.stdout
    assert "leaves out" not in run("analyze", adapter, "--format", "csv").stderr
    assert res.stderr.count("\n") == 1  # one line, and no progress bar when stderr is no terminal


def test_intruders_are_off_by_default_and_on_with_the_flag(llama, llama_full):
    _, base = llama
    common = ("analyze", llama_full, "--base", base, "--format", "json", "-q",
              "--include", r"layers\.0\.self_attn\.q_proj")
    off = json.loads(run(*common).output)
    assert off and all(r["intruders"] is None for r in off)
    assert all(r["relative_norm"] > 0 for r in off)  # the base is used, only intruders are off
    on = json.loads(run(*common, "--intruders").output)
    assert all(isinstance(r["intruders"], int) and 0 <= r["intruders"] <= 10 for r in on)
    assert json.loads(run(*common, "--no-intruders").output) == off


def test_snapshot_output_check_include_and_top_k(llama_lora, tmp_path):
    adapter, _ = llama_lora
    baseline = tmp_path / "b.json"
    res = run("snapshot", adapter, "--output", baseline, "-q", "--top-k", "2")
    assert res.exit_code == 0, res.output
    data = json.loads(baseline.read_text())
    assert data["top_k"] == 2 and data["intruders"] is False
    old = tmp_path / "old.json"
    assert run("snapshot", adapter, "--out", old, "-q", "--top-k", "2").exit_code == 0  # alias
    assert json.loads(old.read_text())["modules"].keys() == data["modules"].keys()
    res = run("check", adapter, "-b", baseline, "--include", "q_proj", "--top-k", "2",
              "--format", "json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["passed"] and {m["module"].rsplit(".", 1)[-1] for m in doc["modules"]} == {"q_proj"}
    assert len(doc["ignored_modules"]) == len(data["modules"]) - len(doc["modules"])
    res = run("check", adapter, "-b", baseline, "--top-k", "3")
    assert res.exit_code == 2 and "top_k = 2" in res.output and "Traceback" not in res.output
    assert run("snapshot", adapter, "-q").exit_code == 2  # the output file is required


def test_report_takes_device_and_the_shared_options(llama_lora, tmp_path):
    adapter, _ = llama_lora
    out = tmp_path / "rep"
    res = run("report", f"lora={adapter}", "--out", out, "--device", "cpu", "--include",
              "q_proj", "--format", "json", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["updates"] == {"lora": str(adapter)}
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics["kind"]) == {"q_proj"}
    assert run("report", f"lora={adapter}", "--device", "nope", "--out", tmp_path / "r2",
               "-q").exit_code == 2


HELP_PROBE = """
import sys
from deltaspec.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "pandas", "numpy") if m in sys.modules)
print("HEAVY", code, *heavy)
"""


@pytest.mark.parametrize("args", [["--help"], ["analyze", "--help"], ["check", "--help"],
                                  ["report", "--help"], ["train", "--help"], ["analyze"],
                                  ["compare", "a", "b", "--top-k", "0"]])
def test_help_and_argument_errors_import_no_torch(args):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True,
                          text=True, check=False)
    last = proc.stdout.strip().splitlines()[-1].split()
    assert last[0] == "HEAVY" and last[1] in ("0", "2"), proc.stdout + proc.stderr
    assert last[2:] == [], f"{args} imported {last[2:]}"


def test_each_checkpoint_is_loaded_once(llama_lora, monkeypatch, tmp_path):
    from deltaspec.gate.snapshot import take_snapshot
    from deltaspec.loaders import registry
    from deltaspec.report import data as report_data

    calls = []
    real = registry.load_side

    def counting(side, opts):
        calls.append(str(side.given))
        return real(side, opts)

    monkeypatch.setattr(registry, "load_side", counting)  # the torch executor's one loader call
    monkeypatch.setattr(report_data, "load_side", counting)
    adapter, _ = llama_lora
    report_data.collect({"a": adapter, "b": adapter}, include="q_proj", device="cpu")
    assert calls == [str(adapter)] * 2  # one load per update, none inside the analysis
    calls.clear()
    take_snapshot(adapter, include="q_proj", device="cpu")
    assert calls == [str(adapter)]
