"""`deltaspec.testing.assert_spectra_within`: pass, a readable failure, and keyword overrides."""

from __future__ import annotations

import json
import re

import pytest
from test_check import boost_top_direction, rewrite

from deltaspec.errors import ConfigError, DeltaspecError, UsageError
from deltaspec.gate.check import DEFAULT_TOLERANCES
from deltaspec.gate.snapshot import take_snapshot, write_baseline
from deltaspec.testing import assert_spectra_within, rules_from_keywords


@pytest.fixture(scope="module")
def setup(llama_lora, tmp_path_factory):
    folder, _ = llama_lora
    tmp = tmp_path_factory.mktemp("helper")
    baseline = tmp / "baseline.json"
    write_baseline(take_snapshot(folder), baseline)
    regressed = rewrite(folder, tmp / "regressed", boost_top_direction)
    return folder, baseline, regressed


def test_same_adapter_passes(setup):
    folder, baseline, _ = setup
    outcome = assert_spectra_within(folder, baseline)
    assert outcome.ok and len(outcome.modules) == 14


def test_regression_raises_a_readable_assertion(setup):
    _, baseline, regressed = setup
    with pytest.raises(AssertionError) as info:
        assert_spectra_within(regressed, baseline)
    msg = str(info.value)
    first = msg.splitlines()[0]
    assert first == f"spectra of {regressed} regressed against {baseline}:"
    listed = [ln for ln in msg.splitlines()[1:] if ln.startswith("  ")]
    assert len(listed) == 6  # the 3 default metrics × the 2 boosted q_proj modules
    assert all(re.match(r"  model\.layers\.[01]\.self_attn\.q_proj: \w+ \S+ vs baseline", ln)
               for ln in listed)
    assert "FAILED, 6 of 70 checks on 2 of 14 modules" in msg


def test_keyword_overrides(setup):
    folder, baseline, regressed = setup
    off = {m: False for m in DEFAULT_TOLERANCES}
    assert assert_spectra_within(regressed, baseline, **off).ok  # only the subspace is checked
    with pytest.raises(AssertionError, match="top1_share"):
        assert_spectra_within(regressed, baseline, **{**off, "top1_share": 0.1})
    assert assert_spectra_within(regressed, baseline, **{**off, "top1_share": 0.7}).ok
    with pytest.raises(AssertionError, match=r"normalized_entropy \S+ < 0\.9"):
        assert_spectra_within(folder, baseline, normalized_entropy=">= 0.9")
    with pytest.raises(AssertionError, match=r"stable_rank \S+ < 1\.5"):
        assert_spectra_within(regressed, baseline, **off, bounds={"stable_rank": {"min": 1.5}})
    # identical subspaces pass even φ ≥ 1 (the float16 storage error is allowed for)
    assert assert_spectra_within(regressed, baseline, **off, min_similarity=1.0, subspace_k=2).ok


def test_rules_file_and_dict(setup, tmp_path):
    folder, baseline, regressed = setup
    rules = tmp_path / "r.toml"
    rules.write_text("ignore = ['q_proj']\n")
    assert assert_spectra_within(regressed, baseline, rules=rules).ok
    assert assert_spectra_within(regressed, baseline, rules={"ignore": ["q_proj"]}).ok
    with pytest.raises(AssertionError):  # the keyword wins over the file
        assert_spectra_within(regressed, baseline, rules=rules, ignore=[])


def test_bad_input_is_a_deltaspec_error(setup, tmp_path):
    folder, baseline, _ = setup
    with pytest.raises(UsageError, match="unknown keyword 'entropyy'"):
        assert_spectra_within(folder, baseline, entropyy=0.1)
    with pytest.raises(ConfigError, match="unknown metric"):
        assert_spectra_within(folder, baseline, rules={"defaults": {"nope": {"abs": 1}}})
    old = tmp_path / "old.json"
    data = json.loads(baseline.read_text())
    old.write_text(json.dumps({**data, "version": 0}))
    with pytest.raises(DeltaspecError, match="format version 0 is not supported"):
        assert_spectra_within(folder, old)


def test_rules_from_keywords_structure():
    assert rules_from_keywords({"top1_share": 0.1, "fro_norm": False, "stable_rank": ">= 2",
                                "min_similarity": 0.7, "fail_on_new": True}) == {
        "defaults": {"top1_share": {"abs": 0.1}, "fro_norm": False},
        "bounds": {"stable_rank": ">= 2"}, "subspace": {"min_similarity": 0.7},
        "fail_on_new": True}
