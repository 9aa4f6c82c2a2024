"""Hostile configs and tensors of every loader: one schema per config checked before arithmetic,
bounded loops and patterns, memory estimated before allocating, honest expert counts (issue 23)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_loaders_moe import _lora_moe, mixlora

import deltaspec
from deltaspec import delta as delta_mod
from deltaspec import patterns
from deltaspec.errors import CheckpointError, ConfigError, DeltaspecError, ShapeError

Q = "base_model.model.model.layers.0.self_attn.q_proj"  # the tiny Llama's (32, 32) q_proj


def adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """A PEFT-style adapter folder written by hand (hostile values need no PEFT)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return folder


ONE = {f"{Q}.x": torch.zeros(2)}
BAD_CONFIGS = {  # (config, the key the one-line error must name)
    "oft_eps_string": ({"peft_type": "OFT", "coft": True, "eps": "0.001"}, "eps"),
    "oft_coft_eps_string": ({"peft_type": "OFT", "coft": True, "coft_eps": "0.001"}, "coft_eps"),
    "oft_terms_1e12": ({"peft_type": "OFT", "num_cayley_neumann_terms": 1e12}, "num_cayley_neumann_terms"),
    "oft_terms_huge_int": ({"peft_type": "OFT", "num_cayley_neumann_terms": 10**12},
                           "num_cayley_neumann_terms"),
    "oft_terms_string": ({"peft_type": "OFT", "num_cayley_neumann_terms": "5"}, "num_cayley_neumann_terms"),
    "vera_seed_20_digits": ({"peft_type": "VERA", "projection_prng_key": 10**20 - 1}, "projection_prng_key"),
    "fourierft_seed_20_digits": ({"peft_type": "FOURIERFT", "random_loc_seed": 10**20 - 1},
                                 "random_loc_seed"),
    "adalora_init_r_negative": ({"peft_type": "ADALORA", "init_r": -4}, "init_r"),
    "mixlora_rank_0": ({"peft_type": "MIXLORA", "r": 0, "lora_alpha": 8}, "r"),
    "mixlora_expert_list": ({"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8, "expert_lora": [2, 6]},
                            "expert_lora"),
    "mixlora_expert_rank_0": ({"peft_type": "MIXLORA", "r": 4, "lora_alpha": 8,
                               "expert_lora": {"r": 0}}, "r"),
    "hydralora_rank_0": ({"peft_type": "LORA", "lora_nums": 3, "r": 0, "lora_alpha": 8}, "r"),
    "hydralora_no_experts": ({"peft_type": "LORA", "lora_nums": 0, "r": 4, "lora_alpha": 8}, "lora_nums"),
    "loha_rank_string": ({"peft_type": "LOHA", "r": "8"}, "r"),
    "lokr_alpha_string": ({"peft_type": "LOKR", "alpha": "x"}, "alpha"),
    "ia3_feedforward_number": ({"peft_type": "IA3", "feedforward_modules": 5}, "feedforward_modules"),
    "lora_rank_0": ({"peft_type": "LORA", "r": 0}, "r"),
    "lora_alpha_string": ({"peft_type": "LORA", "lora_alpha": "16"}, "lora_alpha"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_values_are_one_line_naming_the_key(tmp_path, llama, case):
    config, key = BAD_CONFIGS[case]
    folder = adapter(tmp_path / "a", config, ONE)
    with pytest.raises(ConfigError) as exc:
        deltaspec.load(folder, base=llama[1])
    text = str(exc.value)
    assert "\n" not in text and "adapter_config.json" in text and repr(key) in text


def test_multilora_rank_0_config(tmp_path):
    (tmp_path / "multilora_config.json").write_text(json.dumps({"lora_alpha": 4, "r": 0}))
    save_file({"m.lora_A": torch.zeros(2, 1, 4)}, str(tmp_path / "multilora_model.safetensors"))
    with pytest.raises(ConfigError, match=r"multilora_config\.json: 'r' must be an integer"):
        deltaspec.load(tmp_path)


def test_mtl_lora_rank_0_tensors_are_refused_not_divided(tmp_path):
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    m = "model.layers.0.self_attn.q_proj"
    torch.save({f"{m}.lora_A": torch.zeros(1, 0, 8), f"{m}.lora_B": torch.zeros(2, 8, 0),
                f"{m}.lora_B_w": torch.zeros(3, 2), f"{m}.lora_lambdas": torch.zeros(3, 0)},
               ckpt / "final_checkpoint.pt")
    with pytest.raises(CheckpointError, match="rank 0"):
        deltaspec.load(tmp_path, lora_alpha=16)


def test_boft_one_by_one_blocks_are_a_shape_error(tmp_path, llama):
    folder = adapter(tmp_path / "b", {"peft_type": "BOFT"},
                     {f"{Q}.boft_R": torch.zeros(2, 32, 1, 1), f"{Q}.boft_s": torch.ones(32, 1)})
    with pytest.raises(ShapeError, match=r"boft_R has shape \(2, 32, 1, 1\)"):
        deltaspec.load(folder, base=llama[1])


@pytest.mark.parametrize("kind", ["mixlora", "loramoe"])
def test_moe_configs_announcing_more_experts_than_saved_are_refused(tmp_path, kind):
    folder = mixlora(tmp_path / "m")[0] if kind == "mixlora" else _lora_moe(tmp_path / "m", True)[0]
    cfg = json.loads((folder / "adapter_config.json").read_text())
    key = "num_experts" if kind == "mixlora" else "lora_nums"
    (folder / "adapter_config.json").write_text(json.dumps(cfg | {key: 8}))
    with pytest.raises(ConfigError, match=rf"{key} is 8 but .* saves 3 expert"):
        deltaspec.load(folder)


def test_ia3_type_with_lora_tensors_says_the_type_does_not_match(tmp_path, llama_lora):
    folder = shutil.copytree(llama_lora[0], tmp_path / "a")
    cfg = json.loads((folder / "adapter_config.json").read_text()) | {"peft_type": "IA3"}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        deltaspec.load(folder)
    assert "peft_type 'IA3' does not match its tensors" in str(exc.value)
    assert "--base" not in str(exc.value)


REDOS = "(a?){30}a{30}"


def test_patterns_from_files_run_in_bounded_time(tmp_path, llama):
    """rank_pattern / alpha_pattern keys and IA3's feedforward_modules with an exponential
    regex for re: answered at once, with re's own verdict."""
    t0 = time.perf_counter()
    assert patterns.fullmatch(REDOS, "a" * 30) and not patterns.search(REDOS, "a" * 29 + "b" * 40)
    lora = adapter(tmp_path / "l", {"peft_type": "LORA", "r": 2, "rank_pattern": {REDOS: 2},
                                    "alpha_pattern": {REDOS: 4}},
                   {f"{Q}.lora_A.weight": torch.randn(2, 32), f"{Q}.lora_B.weight": torch.randn(32, 2)})
    b, _ = deltaspec.load(lora)[Q.removeprefix("base_model.model.")].factors()
    assert b.shape == (32, 2)
    ia3 = adapter(tmp_path / "i", {"peft_type": "IA3", "feedforward_modules": REDOS},
                  {f"{Q}.ia3_l": torch.ones(32, 1)})
    deltaspec.load(ia3, base=llama[1])[Q.removeprefix("base_model.model.")].dense()
    assert time.perf_counter() - t0 < 10


def test_an_include_pattern_that_matches_nothing_is_an_error(llama_lora):
    with pytest.raises(DeltaspecError, match="--include 'nothing-matches' matches none"):
        deltaspec.analyze(llama_lora[0], include="nothing-matches", discover_base=False)
    t0 = time.perf_counter()
    with pytest.raises(DeltaspecError, match="matches none"):
        deltaspec.analyze(llama_lora[0], include=REDOS, discover_base=False)
    assert time.perf_counter() - t0 < 10


def _loha(folder: Path, r: int, shape=(8, 6), alpha=3.0) -> tuple[Path, np.ndarray]:
    g = torch.Generator().manual_seed(0)
    t = {f"{Q}.hada_w{i}_{s}": torch.randn(*(shape[0], r) if s == "a" else (r, shape[1]), generator=g)
         for i in (1, 2) for s in ("a", "b")}
    f = {k: v.double().numpy() for k, v in t.items()}
    want = (f[f"{Q}.hada_w1_a"] @ f[f"{Q}.hada_w1_b"]) * (f[f"{Q}.hada_w2_a"] @ f[f"{Q}.hada_w2_b"])
    return adapter(folder, {"peft_type": "LOHA", "r": r, "alpha": alpha}, t), want * alpha / r


@pytest.mark.parametrize("r", [2, 16])
def test_loha_of_large_rank_goes_dense_with_the_same_update(tmp_path, r):
    """r² ≥ min(out, in): ΔW formed densely instead of Khatri–Rao factors of width r²."""
    folder, want = _loha(tmp_path / "h", r)
    d = deltaspec.load(folder)[Q.removeprefix("base_model.model.")]
    assert d.is_factored == (r * r < 6)
    np.testing.assert_allclose(d.dense(torch.float64).numpy(), want, rtol=1e-6, atol=1e-6)
    sigma = np.linalg.svd(want, compute_uv=False)
    np.testing.assert_allclose(deltaspec.spectrum(d).values[:6].numpy(), sigma, rtol=1e-4, atol=1e-5)


def _lokr(folder: Path) -> tuple[Path, np.ndarray]:
    g = torch.Generator().manual_seed(1)
    w1, w2 = torch.randn(4, 4, generator=g), torch.randn(8, 8, generator=g)
    folder = adapter(folder, {"peft_type": "LOKR", "r": 4, "alpha": 4},
                     {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2})
    return folder, np.kron(w1.double().numpy(), w2.double().numpy())


def test_kronecker_updates_are_never_multiplied_out_to_be_analysed(tmp_path, monkeypatch):
    folder, want = _lokr(tmp_path / "k")
    monkeypatch.setattr(torch, "kron", lambda *a: pytest.fail("densified a Kronecker update"))
    df = deltaspec.analyze(folder, discover_base=False, intruders=False)
    sigma = np.linalg.svd(want, compute_uv=False)
    assert df["spectral_norm"].iloc[0] == pytest.approx(sigma[0], rel=1e-5)


def test_a_dense_kronecker_product_over_budget_is_refused_first(tmp_path, monkeypatch):
    folder, _ = _lokr(tmp_path / "k")
    d = deltaspec.load(folder)[Q.removeprefix("base_model.model.")]
    monkeypatch.setattr(delta_mod, "memory_budget", lambda: 1024)
    monkeypatch.setattr(torch, "kron", lambda *a: pytest.fail("allocated before checking"))
    with pytest.raises(CheckpointError, match=r"dense Kronecker product would need .* GiB"):
        d.dense()


def test_vera_with_an_absurd_r_is_refused_before_regenerating(tmp_path, llama):
    folder = adapter(tmp_path / "v", {"peft_type": "VERA", "r": 60000, "save_projection": False},
                     {f"{Q}.vera_lambda_b": torch.ones(32), f"{Q}.vera_lambda_d": torch.ones(4)})
    with pytest.raises(ConfigError, match=r"r is 60000 but the modules' vera_lambda_d"):
        deltaspec.load(folder, base=llama[1])
