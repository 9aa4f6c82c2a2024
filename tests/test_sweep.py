"""The democracy sweep (analyses/democracy_sweep.py): a --quick run end to end, its statistics."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ANALYSES = Path(__file__).resolve().parent.parent / "analyses"
sys.path.insert(0, str(ANALYSES))

import democracy_sweep as S  # noqa: E402
import sweep_stats as T  # noqa: E402


def test_welch_and_t_intervals_by_hand() -> None:
    a, b = np.array([0.80, 0.82, 0.81, 0.79, 0.83]), np.array([0.86, 0.85, 0.88, 0.84, 0.87])
    m, lo, hi = T.mean_ci(a)
    half = stats.t.ppf(0.975, 4) * a.std(ddof=1) / np.sqrt(5)
    assert (m, lo, hi) == pytest.approx((0.81, 0.81 - half, 0.81 + half))
    w = T.welch(a, b)
    ref = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert (w["lo"], w["hi"]) == pytest.approx((ref.low, ref.high))
    assert T.three_way(w["lo"], w["hi"], +1) == "holds"
    assert T.three_way(w["lo"], w["hi"], -1) == "reversed"
    assert T.three_way(-0.1, 0.2, +1) == "inconclusive"


@pytest.mark.slow
def test_quick_sweep_writes_incremental_results(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    args = ["--out", str(out), "--work", str(tmp_path / "work"), "--quick", "--writeup", ""]
    assert S.main(args) == 0
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    # 2 seeds of every core arm, then seeds of the primary pair up to the quick cap (3)
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        [(v, s) for v in S.CORE for s in (0, 1)] + [(v, 2) for v in S.ADAPTIVE])
    assert all(r["steps_run"] <= 12 and 0 < r[S.PRIMARY] <= 1 for r in runs)
    for r in runs:  # common modules only: the full FT's lm_head and embeddings are left out
        assert r["modules"] == 14 and len(r["per_module"]) == 14
        assert all(m["module"].rpartition(".")[2] in ("q_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj") and len(m["sigma"]) >= 16
                   for m in r["per_module"])
        kinds = {"lora": {"random"}, "multilora": {"random", "equalised"},
                 "full": {"random", "projected"}}[r["method"]]
        assert set(r["nulls"]) == kinds and r["base_sha256"] == runs[0]["base_sha256"]
    # every σ is stored: the primary metric re-sliced from them equals the stored one
    from deltaspec.metrics.within import share_within

    full = next(r for r in runs if r["method"] == "full")
    again = np.mean([share_within(m["sigma"], 1, S.R) for m in full["per_module"]])
    assert again == pytest.approx(full[S.PRIMARY], rel=1e-5)
    res = json.loads((out / "results.json").read_text())
    assert {c["verdict"] for c in res["comparisons"]} <= {"holds", "reversed", "inconclusive"}
    ps = [c["p"] for c in res["comparisons"]]
    assert [c["p_holm"] for c in res["comparisons"]] == pytest.approx(T.holm(ps))
    assert (out / "sweep.png").stat().st_size > 0 and "| lora | 3 |" in (out / "tables.md").read_text()
    assert S.main(args) == 0  # a rerun finds every run done and only re-renders
    assert len((out / "runs.jsonl").read_text().splitlines()) == 8


def test_committed_results_and_writeup_agree() -> None:
    """figures/sweep/runs.jsonl has >= 2 seeds for every core arm, analysed over the 14 common
    modules; the tables of the write-up are exactly what sweep_stats renders from it, and the
    held-out counts it states are those of the data it used."""
    from deltaspec.reference import build_mixture, quick_data_config

    root = ANALYSES.parent
    runs = T.load_runs(root / "figures" / "sweep" / "runs.jsonl")
    seeds = runs.groupby("variant")["seed"].nunique()
    assert all(seeds.get(arm, 0) >= 2 for arm in S.CORE), seeds.to_dict()
    assert (runs["modules"] == 14).all()
    writeup = (ANALYSES / "democracy_sweep.md").read_text()
    assert T.tables_md(runs) in writeup
    assert T.tables_md(runs) == (root / "figures" / "sweep" / "tables.md").read_text()
    counts = {t: len(v) for t, v in build_mixture(quick_data_config(0)).heldout.items()}
    stated = ", ".join(f"{t} {n}" for t, n in counts.items())
    assert f"held-out questions per task: {stated}" in " ".join(writeup.split())
