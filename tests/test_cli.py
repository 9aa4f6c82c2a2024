"""The CLI as a user runs it: analyze and compare print readable tables, JSON and CSV."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from deltaspec.cli import main


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_compare_lora_and_full_prints_a_table(llama, llama_lora, llama_full):
    _, base = llama
    adapter, _ = llama_lora
    proc = subprocess.run(
        [sys.executable, "-m", "deltaspec.cli", "compare", str(adapter), str(llama_full),
         "--base", str(base)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("module", "normalized_entropy_a", "effective_rank_b", "subspace_sim_left",
                 "model.layers.0.self_attn.q_proj", "mean per module kind"):
        assert word in out
    assert "Traceback" not in proc.stderr


def test_analyze_formats(llama_lora, tmp_path):
    adapter, _ = llama_lora
    table = run("analyze", adapter, "-q")
    assert table.exit_code == 0 and "normalized_entropy" in table.output
    js = run("analyze", adapter, "--format", "json", "-q")
    rows = json.loads(js.output)
    assert len(rows) == 14 and {"module", "entropy", "effective_rank"} <= set(rows[0])
    csv = run("analyze", adapter, "--format", "csv", "-q")
    df = pd.read_csv(io.StringIO(csv.output))
    assert len(df) == 14 and df["rank_bound"].eq(4).all()
    out = tmp_path / "r.csv"
    res = run("analyze", adapter, "--format", "csv", "--output", out, "-q", "--top-k", "2")
    assert res.exit_code == 0 and res.output == ""
    assert (pd.read_csv(out)["effective_rank"] <= 2 + 1e-9).all()
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temp file left


def test_analyze_full_needs_base(llama_full, tmp_path):
    res = run("analyze", llama_full, "--output", tmp_path / "x.json")
    assert res.exit_code == 2
    assert res.output.strip().startswith("deltaspec: error:") and "--base" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


def test_help_explains_commands():
    res = run("--help")
    assert res.exit_code == 0 and "analyze" in res.output and "compare" in res.output
    res = run("compare", "--help")
    assert "--format" in res.output and "B − A" in res.output


def test_no_arguments_prints_help():
    proc = subprocess.run([sys.executable, "-m", "deltaspec"], capture_output=True, text=True)
    assert "Usage: deltaspec" in proc.stdout + proc.stderr and "Commands:" in proc.stdout + proc.stderr
    assert "error" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("args, says", [
    (["--bogus"], "No such option '--bogus' (see 'deltaspec --help')"),
    (["nocmd"], "No such command 'nocmd'"),
    (["analyze"], "Missing argument 'PATH' (see 'deltaspec analyze --help')"),
    (["analyze", "x", "--device", "gpu0"], "'gpu0' is not a device: use auto, cpu, cuda or cuda:N"),
    (["train", "--out", "x"], "Choose from: lora, multilora, full"),
    (["demo", "--device", "tpu"], "'tpu' is not a device"),
])
def test_usage_errors_are_one_line(args, says, tmp_path):
    """Click's usage errors come out as the one line every other error is, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "deltaspec", *args], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltaspec: error: ") and says in lines[0]


def test_table_leaves_out_columns_with_no_value(llama, llama_lora):
    """Without --intruders the table has no intruders column of <NA>s; CSV keeps every column."""
    (adapter, _), (_, base) = llama_lora, llama
    res = run("analyze", adapter, "--base", base, "-q")
    assert res.exit_code == 0, res.output
    header = res.stdout.splitlines()[0].split()
    assert "intruders" not in header and "<NA>" not in res.stdout and "nan" not in res.stdout
    csv = pd.read_csv(io.StringIO(run("analyze", adapter, "--base", base, "-q", "--format",
                                      "csv").stdout))
    assert "intruders" in csv.columns and csv["intruders"].isna().all()
