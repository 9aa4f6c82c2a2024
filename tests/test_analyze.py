"""analyze / compare on genuine tiny checkpoints: rows, columns, dtypes, semantics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import deltaspec
from deltaspec import columns as cols
from deltaspec.analyze import run
from deltaspec.errors import DeltaspecError, UsageError
from deltaspec.options import Options

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_analyze_lora_one_row_per_module(llama_lora):
    adapter, _ = llama_lora
    df = deltaspec.analyze(adapter)
    assert list(df.columns) == cols.analyze_columns(with_base=False)
    assert len(df) == 2 * len(LINEARS)
    assert set(df["kind"]) == set(LINEARS)
    assert (df["method"] == "lora").all() and (df["rank_bound"] == 4).all()
    assert df["layer"].dtype == "Int64" and set(df["layer"]) == {0, 1}
    assert (df["rank"] <= 4).all() and (df["normalized_entropy"].between(0, 1)).all()


def test_analyze_values_match_numpy(llama_lora):
    adapter, _ = llama_lora
    deltas = deltaspec.load(adapter)
    result = run(deltas, opts=Options(keep_spectra=True))
    df = result.frame()
    for name, sp in result.spectra.items():
        want = np.linalg.svd(deltas[name].dense(torch.float64).numpy(), compute_uv=False)
        assert np.allclose(sp.values.numpy(), want, atol=1e-9 * want[0])
        row = df.set_index("module").loc[name]
        p = want / want.sum()
        p = p[p > 0]
        assert row["entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-6, abs=1e-9)


def test_analyze_full_with_base_has_base_relative_metrics(llama, llama_full):
    _, base = llama
    df = deltaspec.analyze(llama_full, base=base)
    assert list(df.columns) == cols.analyze_columns(with_base=True)
    lin = df[df["kind"].isin(LINEARS)]
    assert (lin["method"] == "full").all()
    assert (lin["relative_norm"] > 0).all()
    assert (lin["amplification"] > 0).all()
    assert df["intruders"].isna().all()  # opt-in: a full decomposition of every base matrix
    on = deltaspec.analyze(llama_full, base=base, intruders=True, include=r"layers\.0\.")
    assert on["intruders"].notna().all() and on["intruders"].between(0, 10).all()


def test_top_k_include_and_shard(llama_lora):
    adapter, _ = llama_lora
    full = deltaspec.analyze(adapter)
    top = deltaspec.analyze(adapter, top_k=2)
    assert (top["effective_rank"] <= 2 + 1e-9).all()
    assert not np.allclose(top["normalized_entropy"], full["normalized_entropy"])
    q = deltaspec.analyze(adapter, include=r"q_proj$")
    assert set(q["kind"]) == {"q_proj"}
    parts = [deltaspec.analyze(adapter, shard=(r, 3)) for r in range(3)]
    assert sorted(pd.concat(parts)["module"]) == sorted(full["module"])


def test_unknown_option_and_bad_values_are_usage_errors(llama_lora):
    adapter, _ = llama_lora
    with pytest.raises(UsageError, match="unknown option"):
        deltaspec.analyze(adapter, topk=3)
    with pytest.raises(UsageError):
        deltaspec.analyze(adapter, top_k=0)
    with pytest.raises(UsageError):
        deltaspec.analyze(adapter, include="(")


def test_compare_lora_vs_full(llama, llama_lora, llama_full):
    _, base = llama
    adapter, _ = llama_lora
    df = deltaspec.compare(adapter, llama_full, base=base)
    assert list(df.columns) == cols.compare_columns(with_base=True)
    assert len(df) == 2 * len(LINEARS)
    assert (df["method_a"] == "lora").all() and (df["method_b"] == "full").all()
    for c in ("subspace_sim_left", "subspace_sim_right"):
        assert df[c].between(0, 1 + 1e-9).all()
    # a dense random update is flatter than a rank-4 LoRA
    assert (df["normalized_entropy_b"] > df["normalized_entropy_a"]).all()
    assert df.attrs["only_b"]  # embeddings and lm_head exist only in the full fine-tune


def test_compare_with_itself_is_identical(llama_lora):
    adapter, _ = llama_lora
    df = deltaspec.compare(adapter, adapter)
    assert np.allclose(df["cosine"], 1.0)
    assert np.allclose(df["subspace_sim_left"], 1.0) and np.allclose(df["subspace_sim_right"], 1.0)
    assert np.allclose(df["min_angle_left"], 0.0, atol=1e-3)


def test_compare_two_full_checkpoints_without_base_is_b_minus_a(llama, llama_full):
    _, base = llama
    via_compare = deltaspec.compare(base, llama_full)
    via_analyze = deltaspec.analyze(llama_full, base=base)
    pd.testing.assert_frame_equal(via_compare, via_analyze)


def test_zero_update_is_a_row_of_zeros(tmp_path, llama):
    import factories as F

    model, _ = llama
    folder, _ = F.lora_adapter(model, tmp_path / "zero", r=2, target_modules=["q_proj"],
                               init_lora_weights=True)  # PEFT's default: B = 0
    df = deltaspec.analyze(folder)
    assert len(df) == 2
    for c in cols.SPECTRAL:
        assert (df[c] == (1 if c == "untrained" else 0)).all(), c
    cmp = deltaspec.compare(folder, folder)
    assert cmp["subspace_sim_left"].isna().all() and cmp["cosine"].isna().all()


def test_compare_without_common_modules(tmp_path, llama, llama_lora):
    import factories as F

    model, _ = llama
    emb, _ = F.lora_adapter(model, tmp_path / "emb", r=2, target_modules=["embed_tokens"])
    adapter, _ = llama_lora
    with pytest.raises(DeltaspecError, match="no module in common"):
        deltaspec.compare(adapter, emb)


def test_spectra_api(llama_lora):
    adapter, _ = llama_lora
    sp = deltaspec.spectra(adapter, k=3, vectors=True)
    one = next(iter(sp.values()))
    assert one.values.shape == (3,) and one.U.shape[1] == 3
    assert math.isclose(float(one.U[:, 0].norm()), 1.0, rel_tol=1e-9)
