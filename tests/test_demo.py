"""``deltaspec demo --quick`` end to end, and the shipped reference results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from deltaspec.cli import main
from deltaspec.demo import load_reference_results, readme_table, write_reference_results


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    res = CliRunner().invoke(main, ["demo", "--quick", "--seeds", "2", "--out", str(out),
                                    "--cache-dir", str(out / "cache")])
    assert res.exit_code == 0, res.output
    assert "report:" in res.output and "top-1 energy share" in res.output
    assert "module/s" not in res.output and "it/s" not in res.output  # stderr is no terminal: no bars
    return out


@pytest.mark.slow  # the demo_dir fixture runs the whole demo (minutes)
def test_demo_writes_report_with_training_table(demo_dir):
    report = demo_dir / "report"
    assert (report / "index.html").is_file()
    summary = json.loads((report / "summary.json").read_text())
    verdict = summary["verdict"]
    assert verdict["expected_order"] == ["lora", "multilora", "full"]
    assert set(verdict["values"]) == {"lora", "multilora", "full"}
    assert verdict["holds"] is {"holds": True, "reversed": False}.get(verdict["status"])
    assert verdict["runs"] == {"lora": 2, "multilora": 2, "full": 2}  # seeds as the unit
    assert all(p["unit"] == "seeds" and p["n_runs"] == [2, 2] for p in verdict["pairs"])
    metrics = json.loads((demo_dir / "training.json").read_text())
    shas = {m["base_sha256"] for k, runs in metrics.items() if k != "base" for m in runs}
    assert len(shas) == 1 and None not in shas  # every fine-tune records the base it started from
    training = pd.read_csv(report / "training.csv")
    rows = training.set_index("method")
    assert {"lora", "multilora", "full"} <= set(rows.index)
    for col in ("heldout_accuracy", "tokens_per_s", "peak_memory_mb", "trainable_params"):
        assert rows.loc[["lora", "multilora", "full"], col].notna().all(), col
    # LoRA rank n·r against MultiLoRA n×r: matched budgets (MultiLoRA adds only its scalings)
    assert abs(rows.loc["lora", "trainable_params"] - rows.loc["multilora", "trainable_params"]) \
        < 0.01 * rows.loc["lora", "trainable_params"]
    assert (rows.loc[["lora", "multilora", "full"], "seeds"] == 2).all()
    assert "training" in (report / "index.html").read_text()


def test_demo_report_shows_entropy_over_training(demo_dir):
    """Each method logs its trajectory; the report draws it, numbers equal to analyze."""
    import deltaspec

    ckpt, report = demo_dir / "checkpoints", demo_dir / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert "entropy_over_training.png" in summary["figures"]
    assert "Normalised entropy over training" in (report / "index.html").read_text()
    for method in ("lora", "multilora", "full"):
        log = pd.read_csv(ckpt / method / "trajectory.csv")
        steps = sorted(set(log["step"]))
        assert len(steps) == 4 and log["top_k"].eq(16).all()
        if method != "full":  # the numbers: one method (the dense route) is enough
            continue
        last = deltaspec.analyze(ckpt / method / "trajectory" / f"checkpoint-{steps[-1]}",
                                 base=ckpt / "base", top_k=16)
        got = log[log["step"] == steps[-1]].set_index("module")["normalized_entropy"]
        assert got.loc[last["module"]].tolist() == pytest.approx(
            last["normalized_entropy"].tolist(), abs=1e-9)


def _numbers(obj):
    """summary.json without timestamps, durations and paths (what may differ between runs)."""
    if isinstance(obj, dict):
        return {k: _numbers(v) for k, v in obj.items()
                if not re.search(r"time|date|duration|path|updates|base|_s$|per_s|rss", k)}
    if isinstance(obj, list):
        return [_numbers(v) for v in obj]
    return obj


@pytest.mark.slow
def test_same_seed_gives_identical_summary_numbers(demo_dir, tmp_path):
    """A second `demo --quick` (fresh base cache) reproduces every number of the first."""
    out = tmp_path / "again"
    res = CliRunner().invoke(main, ["demo", "--quick", "--seeds", "2", "--out", str(out),
                                    "--cache-dir", str(tmp_path / "cache"), "-q"])
    assert res.exit_code == 0, res.output
    assert not re.search(r"^\[\s*\d+\.\ds\]", res.output, re.M)  # -q: no progress lines
    first = json.loads((demo_dir / "report" / "summary.json").read_text())
    second = json.loads((out / "report" / "summary.json").read_text())
    assert _numbers(first) == _numbers(second)
    pairs = first["verdict"]["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("lora", "multilora"), ("multilora", "full")]
    for p in pairs:
        assert p["ci_low"] <= p["diff"] <= p["ci_high"]
        assert p["verdict"] in ("holds", "reversed", "inconclusive")
    assert first["verdict"]["status"] in ("holds", "reversed", "inconclusive")
    assert "id='show-ref'" not in (out / "report" / "index.html").read_text()  # quick: no overlay


@pytest.mark.slow  # the demo_dir fixture runs the whole demo (minutes)
def test_reference_results_round_trip(demo_dir, tmp_path):
    path = write_reference_results(demo_dir / "report", tmp_path / "ref.json")
    tables = load_reference_results(path)
    assert set(tables) == {"spectra", "metrics", "summary"}
    assert set(tables["spectra"]["label"].astype(str)) == {"lora", "multilora", "full"}


def test_readme_demo_table_is_the_shipped_reference():
    """The README's demo table is rendered from deltaspec/data/reference_results.json, which
    records the command, seed, threads and CPU it was made with."""
    import deltaspec

    root = Path(deltaspec.__file__).resolve().parent
    ref = json.loads((root / "data" / "reference_results.json").read_text())
    assert ref["made_with"]["command"].startswith("deltaspec demo") and ref["made_with"]["cpu"]
    assert readme_table(ref) in (root.parent / "README.md").read_text()


def test_shipped_reference_results_load():
    tables = load_reference_results()
    summary = tables["summary"].set_index("label")
    assert {"lora", "multilora", "full"} <= set(summary.index.astype(str))
    assert summary["normalized_entropy_topk"].between(0, 1).all()


def test_report_with_reference(tmp_path, llama, llama_lora, llama_full):
    _, base = llama
    adapter, _ = llama_lora
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", f"lora={adapter}", f"full={llama_full}", "--base",
                                    str(base), "--out", str(out), "--with-reference", "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "index.html").is_file() and (out / "spectra.png").is_file()


def test_demo_bad_out_is_one_line_exit_2(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", str(target), "-q"])
    assert res.exit_code == 2
    assert res.output.startswith("deltaspec: error:") and len(res.output.strip().splitlines()) == 1
