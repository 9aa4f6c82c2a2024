"""The democracy verdict over seeds (issue 24): status, text, heading and JSON agree on hand-built
cases; the seed-level statistics against scipy; the nulls' properties against float64 numpy; the
K-resolved metrics by hand and the cap of a K above an update's rank."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from deltaspec.errors import DeltaspecWarning
from deltaspec.metrics import spectral_metrics
from deltaspec.metrics.within import cap_k, entropy_within, k_metrics, k_values, share_within
from deltaspec.report import nulls as N
from deltaspec.report.html import _verdict_box
from deltaspec.report.seeds import compare_seeds, holm, welch
from deltaspec.report.verdict import ONE_RUN, summary_table, verdict
from deltaspec.report.verdict_text import headline

LABELS = ("lora", "multilora", "full")


def _metrics(means: dict[str, list[float]], modules: int = 4, spread: float = 0.02,
             seed: int = 0) -> pd.DataFrame:
    """A per-module metrics table whose run r of label L has module values with mean means[L][r]."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, runs in means.items():
        for run, mean in enumerate(runs):
            noise = rng.normal(0, spread, modules)
            noise -= noise.mean()  # the run's module mean is exactly `mean`
            for j in range(modules):
                rows.append({"label": label, "module": f"model.layers.{j}.q_proj", "method": label,
                             "run": run, "share1_of_r": mean + noise[j],
                             "normalized_entropy": 0.5, "normalized_entropy_topk": 0.9,
                             "effective_rank_topk": 3.0, "effective_rank": 3.0,
                             "stable_rank": 2.0, "top1_share": mean})
    df = pd.DataFrame(rows)
    df["label"] = pd.Categorical(df["label"], categories=list(means), ordered=True)
    return df


def _verdict(means: dict[str, list[float]], **kw) -> dict:
    metrics = _metrics(means, **kw)
    return verdict(summary_table(metrics), 4, None, metrics)


def _consistent(v: dict) -> None:
    """Status, holds, heading, text and the page never contradict each other."""
    status, text = v["status"], v["text"]
    assert v["holds"] is {"holds": True, "reversed": False}.get(status)
    assert ("HOLDS" in text) == (status == "holds") and ("REVERSED" in text) == (status == "reversed")
    assert ("INCONCLUSIVE" in text) == (status == "inconclusive")
    assert status in headline(v) or (status == ONE_RUN and "no method verdict" in headline(v))
    doc = json.loads(json.dumps(v, default=float))  # what summary.json holds
    assert doc["status"] == status and doc["holds"] == v["holds"]
    page = _verdict_box(v)
    assert headline(v) in page.replace("&gt;", ">")


def test_verdict_holds_reversed_inconclusive_and_one_run() -> None:
    holds = _verdict({"lora": [0.60, 0.62, 0.61], "multilora": [0.50, 0.52, 0.51],
                      "full": [0.30, 0.31, 0.29]})
    assert holds["status"] == "holds" and all(p["unit"] == "seeds" for p in holds["pairs"])
    reversed_ = _verdict({"lora": [0.40, 0.41, 0.42], "multilora": [0.60, 0.61, 0.59],
                          "full": [0.30, 0.31, 0.29]})
    assert reversed_["status"] == "reversed" and reversed_["pairs"][0]["verdict"] == "reversed"
    unclear = _verdict({"lora": [0.50, 0.60, 0.40], "multilora": [0.52, 0.41, 0.58],
                        "full": [0.30, 0.31, 0.29]})
    assert unclear["status"] == "inconclusive" and unclear["point_order"] in (True, False)
    one = _verdict({"lora": [0.60], "multilora": [0.50], "full": [0.30]})
    assert one["status"] == ONE_RUN and one["holds"] is None
    assert all(p["verdict"] is None and p["unit"] == "modules" for p in one["pairs"])
    assert ("one run per method: this interval is over modules and says nothing about "
            "seed-to-seed variation") in one["text"]
    for v in (holds, reversed_, unclear, one):
        _consistent(v)


def test_seed_level_pairs_are_welch_on_run_means_with_holm() -> None:
    means = {"lora": [0.60, 0.63, 0.58, 0.61], "multilora": [0.55, 0.50, 0.57], "full": [0.3, 0.32]}
    v = _verdict(means)
    raw = []
    for p, (a, b) in zip(v["pairs"], [("lora", "multilora"), ("multilora", "full")], strict=True):
        ref = stats.ttest_ind(means[b], means[a], equal_var=False)
        ci = ref.confidence_interval(0.95)
        assert p["diff"] == pytest.approx(np.mean(means[b]) - np.mean(means[a]), abs=1e-12)
        assert (p["ci_low"], p["ci_high"], p["p"]) == pytest.approx((ci.low, ci.high, ref.pvalue))
        raw.append(ref.pvalue)
    lo, hi = sorted(raw)
    expect = {lo: min(1, 2 * lo), hi: max(min(1, 2 * lo), hi)}  # Holm for two p-values, by hand
    assert [p["p_holm"] for p in v["pairs"]] == pytest.approx([expect[x] for x in raw])


def test_holm_and_welch_by_hand() -> None:
    assert holm([0.01, 0.02, 0.5]) == pytest.approx([0.03, 0.04, 0.5])
    assert holm([0.04, 0.01]) == pytest.approx([0.04, 0.02])
    a, b = [0.80, 0.82, 0.81, 0.79], [0.86, 0.85, 0.88]
    w, ref = welch(a, b), stats.ttest_ind(b, a, equal_var=False)
    assert (w["lo"], w["hi"], w["p"]) == pytest.approx((*ref.confidence_interval(0.95), ref.pvalue))
    rows = compare_seeds([(a, b, +1), (a, b, -1)])
    assert [r["verdict"] for r in rows] == ["holds", "reversed"]
    with pytest.raises(ValueError, match="at least 2"):
        welch([0.1], [0.2, 0.3])


def test_null_effects_beside_the_pairs() -> None:
    metrics = _metrics({"lora": [0.6, 0.62], "multilora": [0.5, 0.52], "full": [0.3, 0.31]})
    rows = [{"label": lb, "run": run, "module": "model.layers.0.q_proj", "null": kind,
             "share1_of_r": val} for lb, kind, vals in
            (("lora", "random", (0.2, 0.2)), ("multilora", "random", (0.2, 0.2)),
             ("full", "random", (0.1, 0.1)), ("multilora", "equalised", (0.45, 0.47)),
             ("full", "projected", (0.55, 0.57))) for run, val in enumerate(vals)]
    v = verdict(summary_table(metrics), 4, None, metrics, pd.DataFrame(rows))
    got = {(n["a"], n["b"], n["null"]): n for n in v["nulls"]}
    proj = got[("multilora", "full", "projected")]
    assert proj["diff"] == pytest.approx(0.56 - 0.51)
    assert proj["observed"] == pytest.approx(0.305 - 0.51)
    assert got[("lora", "multilora", "equalised")]["diff"] == pytest.approx(0.46 - 0.61)
    rand = got[("multilora", "full", "random")]
    assert rand["diff"] == pytest.approx((0.305 - 0.1) - (0.51 - 0.2))
    assert "Beside the nulls" in v["text"]


def test_nulls_against_numpy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 2, 7)), rng.standard_normal((3, 5, 2))
    s = np.array([0.2, -1.0, 3.0])
    eq = N.equalise(s)
    assert np.allclose(np.abs(eq), np.abs(s).mean()) and np.array_equal(np.sign(eq), np.sign(s))
    dense = sum(eq[i] * b[i] @ a[i] for i in range(3)) * 0.5
    np.testing.assert_allclose(N.equalised_values(a, b, s, 0.5), np.linalg.svd(dense)[1],
                               rtol=1e-10, atol=1e-12)
    per_row = rng.uniform(0.5, 2, (3, 5))  # (n, out) scalings: equalised per output row
    assert np.allclose(np.abs(N.equalise(per_row)).std(axis=0), 0)
    w = rng.standard_normal((9, 12))
    sv = N.projected_values(w, 3, seed=4, name="m")
    amat = N.kaiming_uniform(3, 12, N.rng_for(4, "m"))
    np.testing.assert_allclose(sv, np.linalg.svd(w @ amat.T @ amat, compute_uv=False)[:9],
                               rtol=1e-9, atol=1e-12)
    assert int((sv > 1e-9 * sv[0]).sum()) == 3 and np.abs(amat).max() <= 1 / math.sqrt(12)
    r4 = N.random_values((10, 8), 4, seed=0)
    assert r4.shape == (8,) and int((r4 > 1e-9 * r4[0]).sum()) == 4
    assert int((N.random_values((10, 8), 8, seed=0) > 1e-9).sum()) == 8
    np.testing.assert_array_equal(N.random_values((10, 8), 4, 0, "x"),
                                  N.random_values((10, 8), 4, 0, "x"))
    assert N.scaling_spread(np.array([1.0, 1.0, 1.0])) == 0.0


def test_k_resolved_metrics_by_hand() -> None:
    s = np.array([4.0, 2.0, 1.0, 1.0, 0.0, 0.0])
    assert k_values(4) == (1, 2, 4) and k_values(16) == (1, 2, 4, 8, 16)
    p = np.array([4.0, 2.0]) / 6
    assert entropy_within(s, 2) == pytest.approx(-(p * np.log(p)).sum() / math.log(2))
    assert share_within(s, 1, 4) == pytest.approx(16 / 22)
    assert share_within(s, 2, 4) == pytest.approx(20 / 22)
    assert math.isnan(entropy_within(s, 1)) and math.isnan(share_within(s, 5, 4))
    m = k_metrics(s, 4)
    assert m["share1_of_r"] == pytest.approx(16 / 22) and "entropy_top4" in m
    # the zeros past the rank never enter: within the top 4 of a rank-4 update
    assert k_metrics(s, 4) == k_metrics(s[:4], 4)


def test_top_k_above_the_rank_is_capped_with_a_warning(llama_lora) -> None:
    s = np.array([3.0, 2.0, 1.0, 0.0, 0.0, 0.0])  # a rank-3 update padded with zeros
    with pytest.warns(DeltaspecWarning, match="above the structural rank 3"):
        capped = spectral_metrics(s, (6, 6), top_k=6, rank_bound=3)
    assert capped == spectral_metrics(s[:3], (6, 6))  # over its 3 values, ln 3: no zero padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cap_k(3, 3) == 3 and spectral_metrics(s, (6, 6), top_k=2, rank_bound=3)
    from deltaspec.cli import main

    res = CliRunner().invoke(main, ["analyze", str(llama_lora[0]), "--top-k", "32", "--format",
                                    "json", "--no-base-discovery"])
    assert res.exit_code == 0, res.output
    assert res.output.count("above the structural rank 4") == 1  # said once, not per module


def test_base_cache_key_depends_on_threads_and_device() -> None:
    from deltaspec.reference.configs import pretrain_hash, resolve_base_configs

    cfgs = resolve_base_configs(quick=True)
    keys = {pretrain_hash(*cfgs, 1), pretrain_hash(*cfgs, 2), pretrain_hash(*cfgs, 1, "cuda")}
    assert len(keys) == 3 and pretrain_hash(*cfgs, None) == pretrain_hash(*cfgs, 1)
