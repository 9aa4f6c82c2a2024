"""The other PEFT types (AdaLoRA, VeRA, LoHa, LoKr, IA3, OFT, BOFT, FourierFT) against PEFT's own
merge (merge_and_unload() − base, run in float64) on genuine adapters of tiny random models; each
structured route's singular values against float64 numpy on the dense ΔW."""

from __future__ import annotations

import copy
import warnings

import factories as F
import numpy as np
import peft
import pytest
import torch

import deltaspec
from deltaspec.engine.spectrum import route
from deltaspec.errors import CheckpointError, UnsupportedError, UsageError

TOL = 1e-5  # relative Frobenius error against PEFT's merge
SV_TOL = 1e-6  # singular values, relative to σ₁
LLAMA = ["q_proj", "down_proj"]
CONV = ["conv", "point", "head"]

# case → (model fixture, config factory, needs the base, expected route(s))
CASES = {
    "adalora": ("llama", lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                     target_modules=LLAMA), False, {"factored"}),
    "adalora_gpt2": ("gpt2", lambda: peft.AdaLoraConfig(init_r=3, total_step=10, lora_alpha=0,
                                                         target_modules=["c_attn", "c_fc"]),
                     False, {"factored"}),
    "vera": ("llama", lambda: peft.VeraConfig(r=4, target_modules=[*LLAMA, "up_proj"]), True,
             {"factored"}),
    "vera_unsaved_projection": ("llama", lambda: peft.VeraConfig(
        r=4, save_projection=False, projection_prng_key=5, target_modules=[*LLAMA, "up_proj"]),
        True, {"factored"}),
    "vera_gpt2_bias": ("gpt2", lambda: peft.VeraConfig(r=4, target_modules=["c_attn", "c_fc"],
                                                        fan_in_fan_out=True, bias="vera_only"),
                       True, {"factored"}),
    "loha_patterns": ("llama", lambda: peft.LoHaConfig(
        r=2, alpha=3, target_modules=LLAMA, rank_pattern={"down_proj": 3},
        alpha_pattern={"layers.1.self_attn.q_proj": 5}), False, {"factored"}),
    "loha_conv": ("conv", lambda: peft.LoHaConfig(r=2, target_modules=CONV), False,
                  {"factored", "dense"}),
    "loha_conv_tucker": ("conv", lambda: peft.LoHaConfig(r=2, target_modules=CONV,
                                                          use_effective_conv2d=True),
                         False, {"factored", "dense"}),
    "lokr_patterns": ("llama", lambda: peft.LoKrConfig(
        r=2, alpha=3, target_modules=LLAMA, rank_pattern={"down_proj": 3},
        alpha_pattern={"layers.1.self_attn.q_proj": 5}), False, {"kronecker"}),
    "lokr_decompose_both": ("llama", lambda: peft.LoKrConfig(
        r=1, decompose_both=True, decompose_factor=4, target_modules=LLAMA), False, {"kronecker"}),
    "lokr_full_factors": ("llama", lambda: peft.LoKrConfig(r=8, target_modules=LLAMA), False,
                          {"kronecker"}),
    "lokr_conv_tucker": ("conv", lambda: peft.LoKrConfig(
        r=1, target_modules=CONV, use_effective_conv2d=True, decompose_both=True), False,
        {"kronecker"}),
    "ia3": ("llama_biased", lambda: peft.IA3Config(target_modules=[*LLAMA, "k_proj"],
                                                    feedforward_modules=["down_proj"]),
            True, {"dense"}),
    "ia3_regex_gpt2": ("gpt2", lambda: peft.IA3Config(
        target_modules=r".*\.(c_attn|mlp\.c_proj)", feedforward_modules=r".*mlp\.c_proj",
        fan_in_fan_out=True), True, {"dense"}),
    "ia3_conv": ("conv", lambda: peft.IA3Config(target_modules=CONV, feedforward_modules=["point"]),
                 True, {"dense"}),
    "oft": ("llama", lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=LLAMA), True,
            {"dense"}),
    "oft_exact_cayley_bias": ("llama_biased", lambda: peft.OFTConfig(
        r=0, oft_block_size=8, use_cayley_neumann=False, bias="oft_only", target_modules=LLAMA),
        True, {"dense"}),
    "oft_coft": ("llama", lambda: peft.OFTConfig(r=0, oft_block_size=8, coft=True, eps=1e-3,
                                                 target_modules=LLAMA), True, {"dense"}),
    "oft_block_share": ("llama", lambda: peft.OFTConfig(
        r=4, oft_block_size=0, block_share=True, num_cayley_neumann_terms=3, target_modules=LLAMA),
        True, {"dense"}),
    "oft_conv": ("conv", lambda: peft.OFTConfig(r=0, oft_block_size=3, target_modules=CONV), True,
                 {"dense"}),
    "boft": ("llama", lambda: peft.BOFTConfig(boft_block_size=4, target_modules=LLAMA), True,
             {"dense"}),
    "boft_block_num_bias": ("llama_biased", lambda: peft.BOFTConfig(
        boft_block_num=4, boft_block_size=0, bias="boft_only", target_modules=LLAMA), True,
        {"dense"}),
    "fourierft": ("llama", lambda: peft.FourierFTConfig(n_frequency=20, target_modules=LLAMA,
                                                        n_frequency_pattern={"down_proj": 30}),
                  True, {"dense"}),
    "fourierft_gpt2": ("gpt2", lambda: peft.FourierFTConfig(
        n_frequency=20, random_loc_seed=3, scaling=10.0, fan_in_fan_out=True,
        target_modules=["c_attn", "c_fc"]), True, {"dense"}),
}


@pytest.fixture(scope="module")
def bases(llama, gpt2, tmp_path_factory):
    """model fixture name → (model, base folder)."""
    root = tmp_path_factory.mktemp("typed_bases")
    biased = F.tiny_llama_biased()
    with torch.no_grad():  # Llama initialises biases at 0: IA3's Δb = (l − 1)·b would vanish
        for name, p in biased.named_parameters():
            if name.endswith(".bias"):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)))
    conv = F.tiny_conv()
    return {"llama": llama, "gpt2": gpt2,
            "llama_biased": (biased, F.save_model(biased, root / "llama_biased")),
            "conv": (conv, F.save_state_dict(conv, root / "conv"))}


def build(bases, case: str, folder):
    """(model, base folder, PeftModel, loaded deltas) of one case."""
    arch, config, needs_base, _ = CASES[case]
    model, base = bases[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, pm = F.peft_typed_adapter(model, folder, config())
    return model, base, pm, deltaspec.load(folder, base if needs_base else None)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pefts_merge_and_numpy(tmp_path, bases, case):
    model, _, pm, deltas = build(bases, case, tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exp = F.expected_deltas64(model, pm)
    assert exp and set(exp) == set(deltas)
    assert {route(d) for d in deltas.values()} == CASES[case][3]
    for name, want in exp.items():
        d = deltas[name]
        got = d.dense(torch.float64)
        assert got.shape == want.shape == d.shape, name
        assert float((got - want).norm() / want.norm()) < TOL, name
        s = deltaspec.spectrum(d, device="cpu").values.numpy()
        s_np = np.linalg.svd(got.numpy(), compute_uv=False)
        assert np.abs(s - s_np).max() <= SV_TOL * s_np[0], name
        assert d.method == case.split("_")[0]


@pytest.mark.parametrize("case", ["vera_gpt2_bias", "ia3", "oft_exact_cayley_bias",
                                  "boft_block_num_bias"])
def test_bias_updates_are_pefts(tmp_path, bases, case):
    model, _, pm, deltas = build(bases, case, tmp_path / case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = F.expected_bias_deltas(copy.deepcopy(model).double(), copy.deepcopy(pm).double())
    assert want
    for name, b in want.items():
        got = deltas[name].bias().to(torch.float64)
        assert float((got - b).norm() / b.norm()) < TOL, name


def test_kronecker_route_vectors(tmp_path, bases):
    """Top-k vectors of the Kronecker route are orthonormal and give Uᵀ·ΔW·V = diag(σ)."""
    *_, deltas = build(bases, "lokr_patterns", tmp_path / "k")
    for d in deltas.values():
        sp = deltaspec.spectrum(d, k=4, vectors=True, device="cpu")
        w = d.dense(torch.float64)
        assert sp.route == "kronecker" and sp.U is not None and sp.V is not None
        eye = torch.eye(sp.U.shape[1], dtype=torch.float64)
        assert torch.allclose(sp.U.T @ sp.U, eye, atol=1e-10)
        assert torch.allclose(sp.V.T @ sp.V, eye, atol=1e-10)
        assert torch.allclose(sp.U.T @ w @ sp.V, torch.diag(sp.values[:4]), atol=1e-9 * float(sp.values[0]))


def test_adalora_pruned_rank_as_saved(tmp_path, llama):
    """A genuinely pruned AdaLoRA (RankAllocator): the saved rank is the factored rank, modules
    pruned to rank 0 are listed as skipped, ΔW is PEFT's merge."""
    model, _ = llama
    torch.manual_seed(0)
    cfg = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=0, tfinal=1, total_step=4, deltaT=1,
                             target_modules=LLAMA)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for step in range(4):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "ada")
    pattern = pm.peft_config["default"].rank_pattern
    deltas = deltaspec.load(tmp_path / "ada")
    exp = F.expected_deltas64(model, pm)
    kept = {k.removesuffix(".lora_E"): sum(v) for k, v in pattern.items()}
    assert {n for n, r in kept.items() if r} == set(deltas) == set(exp)
    assert any(r == 0 for r in kept.values())
    assert {k for k, why in deltas.skipped if "rank 0" in why}
    for name, d in deltas.items():
        assert d.rank_bound == kept[name]
        assert float((d.dense(torch.float64) - exp[name]).norm() / exp[name].norm()) < TOL


@pytest.mark.parametrize("case", ["vera", "ia3", "oft", "boft", "fourierft"])
def test_types_that_need_the_base_say_so(tmp_path, bases, case):
    arch, config, _, _ = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.peft_typed_adapter(bases[arch][0], tmp_path / "a", config())
    with pytest.raises(UsageError, match=r"adapter_model\.safetensors: .*, so pass --base$"):
        deltaspec.load(tmp_path / "a")


def test_unsupported_options_are_one_line_errors(tmp_path, llama):
    import json

    model, base = llama
    F.peft_typed_adapter(model, tmp_path / "a", peft.AdaLoraConfig(
        init_r=2, total_step=10, target_modules=LLAMA))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg | {"use_dora": True}))
    with pytest.raises(UnsupportedError, match=r"adapter_config\.json: use_dora=True is not "
                                               r"supported for peft_type 'ADALORA'$"):
        deltaspec.load(tmp_path / "a")


def test_a_typed_adapter_with_foreign_keys_names_them(tmp_path, llama_lora):
    """A LoRA adapter relabelled LOKR: nothing is a LoKr tensor, and the error says so."""
    import json
    import shutil

    folder, _ = llama_lora
    shutil.copytree(folder, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text()) | {"peft_type": "LOKR"}
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: the config's peft_type 'LOKR' "
                                              r"does not match its tensors \(no LoKr tensor in .*"
                                              r"adapter_model\.safetensors; the first key is "
                                              r"'.*lora_.*'\)$"):
        deltaspec.load(tmp_path / "a")


@pytest.mark.parametrize(("n", "blocks", "size", "factors"), [(16, 4, 4, 2), (32, 8, 4, 3),
                                                              (24, 6, 4, 1)])
def test_boft_butterfly_is_pefts(n, blocks, size, factors):
    """Several butterfly factors (PEFT builds them only with its CUDA extension): the permutation
    is PEFT's own, and W·Mᵀ applied factor by factor is W times PEFT's product matrix."""
    from peft.tuners.boft.layer import BOFTLayer

    from deltaspec.loaders.peft import boft

    g = torch.Generator().manual_seed(0)
    rot = boft.cayley(torch.randn(factors, blocks, size, size, generator=g, dtype=torch.float64))
    w = torch.randn(5, n, generator=g, dtype=torch.float64)
    m = torch.eye(n, dtype=torch.float64)
    for i in range(factors):
        perm = BOFTLayer.block_butterfly_perm(None, n, int(blocks / 2**i), int(size / 2), factors - 1)
        assert torch.equal(boft.butterfly_perm(n, int(blocks / 2**i), int(size / 2), factors - 1), perm)
        p = BOFTLayer.perm2mat(None, perm).to(torch.float64)
        m = p @ torch.block_diag(*rot[i]) @ p.T @ m
    assert torch.allclose(boft.rotate(w, rot), w @ m.T, atol=1e-12)
