"""Uncertainty of the report's verdict: bootstrap intervals, three-way verdicts, several runs per
method, and the chance level of φ."""

from __future__ import annotations

import factories as F
import numpy as np
import pytest

from deltaspec.errors import UsageError
from deltaspec.report import collect, summary_table, verdict
from deltaspec.report.data import parse_updates
from deltaspec.report.uncertainty import bootstrap_difference, combine, random_subspace_phi
from deltaspec.report.verdict import ONE_RUN


def test_bootstrap_is_seeded_and_matches_hand_cases() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(0.9, 0.04, size=(1, 40))
    b = a + rng.normal(0.002, 0.01, size=(1, 40))  # a tiny shift, much smaller than the spread
    r1, r2 = bootstrap_difference(a, b), bootstrap_difference(a, b)
    assert r1 == r2  # deterministic
    assert r1["diff"] == pytest.approx(float((b - a).mean()), abs=1e-15)
    assert r1["ci_low"] < r1["diff"] < r1["ci_high"]
    d = (b - a)[0]
    assert r1["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert bootstrap_difference(a, b, seed=5)["ci_low"] != r1["ci_low"]
    big = bootstrap_difference(a, a + 0.05 + rng.normal(0, 0.01, size=(1, 40)))
    assert big["verdict"] == "holds" and big["ci_low"] > 0
    assert bootstrap_difference(a + 0.05, a)["verdict"] == "reversed"
    noise = bootstrap_difference(a, a + rng.normal(0, 0.01, size=(1, 40)))
    assert noise["verdict"] == "inconclusive" and noise["ci_low"] < 0 < noise["ci_high"]
    # with runs: the spread between seeds widens the interval
    runs_b = np.vstack([a[0] + s for s in (-0.03, 0.0, 0.04)])
    wide = bootstrap_difference(a, runs_b)
    assert wide["n_runs"] == [1, 3] and wide["ci_high"] - wide["ci_low"] > 0.02
    with pytest.raises(ValueError, match="same modules"):
        bootstrap_difference(a, a[:, :3])
    assert combine([]) == "inconclusive"


def test_random_subspace_phi_against_monte_carlo() -> None:
    mean, sd = random_subspace_phi(32, 4, draws=400)
    assert mean == 4 / 32
    rng = np.random.default_rng(9)
    vals = []
    for _ in range(400):
        qa, _ = np.linalg.qr(rng.standard_normal((32, 4)))
        qb, _ = np.linalg.qr(rng.standard_normal((32, 4)))
        vals.append(np.sum((qa.T @ qb) ** 2) / 4)
    assert np.mean(vals) == pytest.approx(mean, abs=0.01)
    assert sd == pytest.approx(np.std(vals, ddof=1), rel=0.2)


def test_parse_updates_runs_and_globs(tmp_path) -> None:
    for name in ("lora-s0", "lora-s1", "full"):
        (tmp_path / name).mkdir()
    got = parse_updates([f"lora={tmp_path}/lora-s*", f"full={tmp_path / 'full'}",
                         f"ml={tmp_path / 'lora-s0'},{tmp_path / 'lora-s1'}"])
    assert got["lora"] == [str(tmp_path / "lora-s0"), str(tmp_path / "lora-s1")]
    assert got["full"] == str(tmp_path / "full") and len(got["ml"]) == 2
    with pytest.raises(UsageError, match="matches no checkpoint"):
        parse_updates([f"lora={tmp_path}/nothing*"])


@pytest.mark.slow
def test_verdict_pairs_with_several_runs(tmp_path, llama, llama_lora) -> None:
    model, base = llama
    lora2, _ = F.lora_adapter(model, tmp_path / "lora2", seed=7, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])
    ml = F.multilora_adapter(model, tmp_path / "ml", n=2, r=2)
    lora1, _ = F.lora_adapter(model, tmp_path / "lora1", seed=3, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj"])
    data = collect({"lora": [str(lora1), str(lora2)], "multilora": str(ml)}, base)
    assert set(data.metrics["run"]) == {0, 1}
    summary = summary_table(data.metrics)
    row = summary.set_index("label").loc["lora"]
    assert row["runs"] == 2 and row["modules"] == data.metrics.query("label == 'multilora'").shape[0]
    v = verdict(summary, data.top_k, metrics=data.metrics)
    (pair,) = v["pairs"]  # one run of multilora: the module bootstrap, and no method verdict
    assert pair["a"] == "lora" and pair["b"] == "multilora" and pair["n_runs"] == [2, 1]
    assert pair["ci_low"] <= pair["diff"] <= pair["ci_high"] and pair["unit"] == "modules"
    assert v["status"] == ONE_RUN and pair["verdict"] is None and v["holds"] is None
    assert "says nothing about seed-to-seed variation" in v["text"] and "CI" in v["text"]
    data2 = collect({"lora": [str(lora1), str(lora2)], "multilora": [str(ml), str(ml)]}, base)
    v2 = verdict(summary_table(data2.metrics), data2.top_k, metrics=data2.metrics)
    (pair2,) = v2["pairs"]  # two runs each: Welch over the seed-level means
    assert pair2["unit"] == "seeds" and pair2["n_runs"] == [2, 2]
    assert v2["status"] == pair2["verdict"] in ("holds", "reversed", "inconclusive")
