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
    args = ["--out", str(out), "--work", str(tmp_path / "work"), "--quick", "--writeup", "",
            "--variants", "lora,multilora-n4,multilora-n4-lorainit"]
    assert S.main(args) == 0
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
        (v, s) for v in ("lora", "multilora-n4", "multilora-n4-lorainit") for s in (0, 1))
    assert all(r["steps_run"] <= 12 and 0 < r["normalized_entropy_topk"] <= 1 for r in runs)
    assert all(r["trainable_params"] == runs[0]["trainable_params"] for r in runs
               if r["method"] == "lora")
    res = json.loads((out / "results.json").read_text())
    assert {c["verdict"] for c in res["comparisons"]} <= {"holds", "reversed", "inconclusive"}
    assert (out / "sweep.png").stat().st_size > 0 and "| lora | 2 |" in (out / "tables.md").read_text()
    assert S.main(args) == 0  # a rerun finds every run done and only re-renders
    assert len((out / "runs.jsonl").read_text().splitlines()) == 6


CORE = ("lora", "multilora-n1", "multilora-n2", "multilora-n4", "multilora-n8", "full",
        "multilora-n4-lorainit")


def test_committed_results_and_writeup_agree() -> None:
    """figures/sweep/runs.jsonl has >= 5 seeds for every core arm, and the tables of the
    write-up are exactly what sweep_stats renders from it."""
    root = ANALYSES.parent
    runs = T.load_runs(root / "figures" / "sweep" / "runs.jsonl")
    seeds = runs.groupby("variant")["seed"].nunique()
    assert all(seeds.get(arm, 0) >= 5 for arm in CORE), seeds.to_dict()
    stopped = runs["steps_run"] < json.loads((root / "figures" / "sweep" / "meta.json")
                                             .read_text())["budget"]["max_steps"]
    assert stopped.all(), "every run ends by its stopping rule, not at the step cap"
    writeup = (ANALYSES / "democracy_sweep.md").read_text()
    assert T.tables_md(runs) in writeup
    assert T.tables_md(runs) == (root / "figures" / "sweep" / "tables.md").read_text()
