"""PEFT LoRA loader against PEFT's own merge (merge_and_unload() − base) on genuine adapters."""

from __future__ import annotations

import copy
import json
import warnings

import factories as F
import pytest
import torch

import deltaspec
from deltaspec.errors import CheckpointError, UnsupportedError, UsageError
from deltaspec.loaders.peft import config as peft_config
from deltaspec.loaders.store import TensorStore

TOL = 1e-6
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]

# variant → {arch: LoraConfig keywords}; the llama and gpt2 columns test the same feature.
VARIANTS = {
    "plain": {"llama": {"target_modules": LLAMA_ALL}, "gpt2": {"target_modules": GPT2_ALL}},
    "rslora": {"llama": {"target_modules": LLAMA_ALL, "use_rslora": True, "lora_alpha": 16},
               "gpt2": {"target_modules": GPT2_ALL, "use_rslora": True, "lora_alpha": 16}},
    "patterns": {  # a per-layer key, a suffix key and regex keys matching only some layers
        "llama": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"],
                  "rank_pattern": {"layers.0.self_attn.q_proj": 2, "v_proj": 6,
                                   r"layers\.1\.mlp\.(up|down)_proj": 3},
                  "alpha_pattern": {r"layers\.1\..*proj": 3, "q_proj": 5}},
        "gpt2": {"target_modules": GPT2_ALL,
                 "rank_pattern": {"h.0.attn.c_attn": 2, "c_fc": 6},
                 "alpha_pattern": {r"h\.1\..*c_proj": 3, "c_attn": 5}}},
    "embedding": {"llama": {"target_modules": ["embed_tokens", "q_proj"]},
                  "gpt2": {"target_modules": ["wte", "c_attn"]}},
    "dora": {"llama": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
             "gpt2": {"target_modules": ["c_attn", "c_proj"], "use_dora": True}},
    "dora_embedding": {"llama": {"target_modules": ["embed_tokens", "o_proj"], "use_dora": True}},
}
CASES = [(v, a) for v, archs in VARIANTS.items() for a in archs]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of ``a`` against the reference ``b``."""
    return float((a.to(torch.float64) - b).norm() / b.norm())


@pytest.fixture(scope="module")
def models(llama, gpt2):
    return {"llama": llama, "gpt2": gpt2}


def expected(model, pm) -> dict[str, torch.Tensor]:
    exp = F.expected_deltas(model, pm)
    if "transformer.wte" in exp:  # GPT-2's lm_head is the tied wte: one update, not two
        exp.pop("lm_head", None)
    return exp


def canonical_base(model, name: str) -> torch.Tensor:
    w = model.state_dict()[name + ".weight"].to(torch.float64)
    conv = name.rsplit(".", 1)[-1] in F.CONV1D_KINDS and "gpt2" in type(model).__name__.lower()
    return (w.T if conv else w).reshape(w.shape[1] if conv else w.shape[0], -1)


def assert_matches(deltas, exp, tol: float = TOL) -> None:
    assert set(deltas) == set(exp)
    for name, want in exp.items():
        got = deltas[name].dense(torch.float64)
        assert got.shape == want.shape == deltas[name].shape, name
        assert rel(got, want) < tol, (name, rel(got, want))


@pytest.mark.parametrize(("variant", "arch"), CASES)
def test_matches_peft_merge(tmp_path, models, variant, arch):
    model, base = models[arch]
    kw = {"r": 4, "lora_alpha": 8} | VARIANTS[variant][arch]
    folder, pm = F.lora_adapter(model, tmp_path / "a", **kw)
    exp = expected(model, pm)
    with_base = deltaspec.load(folder, base)
    assert_matches(with_base, exp)
    for name, d in with_base.items():  # the base is oriented (out, in) like ΔW
        assert torch.equal(d.base().to(torch.float64), canonical_base(model, name)), name
    if variant.startswith("dora"):
        assert all(not d.is_factored and d.method == "dora"
                   for n, d in with_base.items() if "embed" not in n or variant == "dora_embedding")
        if arch == "llama" and variant == "dora":
            with pytest.raises(UsageError, match="DoRA"):
                deltaspec.load(folder)
        return
    alone = deltaspec.load(folder)  # no base: the factors alone give the same ΔW
    assert_matches(alone, exp)
    assert all(d.is_factored and d.rank_bound <= kw["r"] + 3 for d in alone.values())


def test_dora_embedding_uses_the_saved_base_layer(tmp_path, llama):
    """PEFT saves embed_tokens.base_layer.weight with embedding LoRA; it serves as DoRA's base."""
    model, _ = llama
    folder, pm = F.lora_adapter(model, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["embed_tokens"], use_dora=True)
    keys = TensorStore.from_files([folder / "adapter_model.safetensors"]).keys()
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    assert "base_model.model.model.embed_tokens.lora_magnitude_vector" in keys
    assert_matches(deltaspec.load(folder), expected(model, pm))


def test_pattern_resolution_is_pefts(tmp_path, llama):
    """r and α per module equal those PEFT gives the layers when it loads the adapter.

    PEFT writes adapter_config.json with sort_keys=True, so the patterns' order in the file (the
    order get_pattern_key walks, first key wins, when PEFT reloads) is the sorted one, whatever
    order they were given in; the loader follows the file, as PeftModel.from_pretrained does.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, _ = llama
    for order in (1, -1):
        alpha = dict(list({"q_proj": 5, "layers.0.self_attn.q_proj": 7, r"layers\.\d\.mlp\..*": 11,
                           "up_proj": 13}.items())[::order])
        kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "up_proj", "down_proj"],
              "alpha_pattern": alpha, "rank_pattern": {"layers.1.mlp.up_proj": 2, "mlp.down_proj": 6}}
        folder, _ = F.lora_adapter(model, tmp_path / f"a{order}", **kw)
        config = json.loads((folder / "adapter_config.json").read_text())
        assert list(config["alpha_pattern"]) == sorted(alpha)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(model), folder)
        deltas = deltaspec.load(folder)
        seen = 0
        for name, module in reloaded.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                r = module.r["default"]
                assert peft_config.scale(config, name, r) == pytest.approx(module.scaling["default"])
                assert peft_config.configured_rank(config, name) == r == deltas[name].rank_bound
                seen += 1
        assert seen == 6
        assert_matches(deltas, expected(model, reloaded))
        layer0_q = peft_config.scale(config, "model.layers.0.self_attn.q_proj", 4)
        assert (layer0_q, peft_config.scale(config, "model.layers.1.self_attn.q_proj", 4)) == (7 / 4, 5 / 4)
        assert peft_config.scale(config, "model.layers.0.mlp.up_proj", 2) == 11 / 2


@pytest.mark.parametrize("arch", ["gpt2", "llama_biased"])
def test_lora_bias_is_the_merged_bias_change(tmp_path, models, arch):
    if arch == "gpt2":
        model, base = models["gpt2"]
        targets = ["c_attn", "c_fc"]
    else:
        model = F.tiny_llama_biased()
        base = F.save_model(model, tmp_path / "base")
        targets = ["q_proj", "up_proj"]
    folder, pm = F.lora_adapter(model, tmp_path / "a", r=4, lora_alpha=8, target_modules=targets,
                                lora_bias=True)
    want = F.expected_bias_deltas(model, pm)
    assert len(want) == 4
    for b in (base, None):
        deltas = deltaspec.load(folder, b)
        assert_matches(deltas, expected(model, pm))
        for name, d in deltas.items():
            assert rel(d.bias(), want[name]) < TOL


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_biases(tmp_path, gpt2, bias):
    """bias="lora_only"/"all" saves trained biases as values: with a base they are bias updates."""
    model, base = gpt2
    folder, pm = F.peft_adapter(model, tmp_path / "a", r=4, lora_alpha=8,
                                target_modules=["c_attn", "c_fc"], bias=bias, lora_bias=bias == "all")
    want = F.expected_bias_deltas(model, pm)
    deltas = deltaspec.load(folder, base)
    assert_matches(deltas, expected(model, pm))
    for name, d in deltas.items():
        assert rel(d.bias(), want[name]) < TOL
    others = {k.removeprefix("base_model.model.").removesuffix(".bias") for k, _ in deltas.skipped}
    assert others == set(want) - set(deltas)  # trained biases of modules without LoRA
    alone = deltaspec.load(folder)
    assert all(d.bias is None or bias == "all" for d in alone.values())
    assert sum(k.endswith("base_layer.bias") and "--base" in why for k, why in alone.skipped) == 4


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_modules_to_save(tmp_path, models, arch):
    model, base = models[arch]
    lora = ["q_proj"] if arch == "llama" else ["c_attn"]
    saved = ["lm_head"] if arch == "llama" else ["c_fc"]  # GPT-2 c_fc is a Conv1D with a bias
    folder, pm = F.peft_adapter(model, tmp_path / "a", r=4, lora_alpha=8, target_modules=lora,
                                modules_to_save=saved)
    exp = expected(model, pm)
    deltas = deltaspec.load(folder, base)
    assert_matches(deltas, exp)
    full = {n: d for n, d in deltas.items() if d.method == "modules_to_save"}
    assert len(full) == (1 if arch == "llama" else 2)
    if arch == "gpt2":
        bias = F.expected_bias_deltas(model, pm)
        for name, d in full.items():
            assert d.shape == (128, 32) and rel(d.bias(), bias[name]) < TOL
    alone = deltaspec.load(folder)
    assert set(alone) == set(exp) - set(full)
    assert {k.removeprefix("base_model.model.").removesuffix(".weight") for k, why in alone.skipped
            if "modules_to_save" in why} == set(full)


def test_trainable_tokens(tmp_path, llama):
    model, base = llama
    folder, pm = F.peft_adapter(model, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"],
                                trainable_token_indices=[1, 5, 7])
    exp = expected(model, pm)
    assert set(torch.nonzero(exp["model.embed_tokens"].any(dim=1)).flatten().tolist()) == {1, 5, 7}
    assert_matches(deltaspec.load(folder, base), exp)
    alone = deltaspec.load(folder)
    assert "model.embed_tokens" not in alone
    assert any("trainable_tokens_delta" in k for k, _ in alone.skipped)


def test_named_adapters_in_sub_folders(tmp_path, llama):
    """A non-default adapter is saved under a folder named after it; several need one chosen."""
    from peft import LoraConfig

    model, base = llama
    folder, pm = F.peft_adapter(model, tmp_path / "one", adapter_name="mine", r=4, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"])
    assert (folder / "mine" / "adapter_config.json").is_file()
    exp = expected(model, pm)
    assert_matches(deltaspec.load(folder), exp)
    assert_matches(deltaspec.load(folder / "mine", base), exp)

    torch.manual_seed(9)
    pm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"],
                                       init_lora_weights=False))
    pm.save_pretrained(tmp_path / "two")
    with pytest.raises(UsageError, match="several adapters"):
        deltaspec.load(tmp_path / "two")
    pm.set_adapter("other")
    assert_matches(deltaspec.load(tmp_path / "two" / "other"), expected(model, pm))
    pm.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert_matches(deltaspec.load(tmp_path / "sel"), expected(model, pm))


def test_adapter_model_bin_read_weights_only(tmp_path, llama, monkeypatch):
    model, _ = llama
    folder, pm = F.peft_adapter(model, tmp_path / "a", save_kw={"safe_serialization": False},
                                r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    assert (folder / "adapter_model.bin").is_file()
    assert not (folder / "adapter_model.safetensors").exists()
    calls = []
    real = torch.load

    def spy(*args, **kw):
        calls.append(kw.get("weights_only"))
        return real(*args, **kw)

    monkeypatch.setattr(torch, "load", spy)
    assert_matches(deltaspec.load(folder), expected(model, pm))
    assert calls and all(c is True for c in calls)


def test_conv2d_lora_and_dora(tmp_path):
    model = F.tiny_conv()
    base = F.save_state_dict(model, tmp_path / "base")
    for dora in (False, True):
        folder, pm = F.lora_adapter(model, tmp_path / f"a{dora}", r=2, lora_alpha=4,
                                    target_modules=["conv", "point"], use_dora=dora)
        exp = expected(model, pm)
        assert {n: tuple(t.shape) for n, t in exp.items()} == {"conv": (8, 27), "point": (6, 8)}
        assert_matches(deltaspec.load(folder, base), exp)
        if not dora:
            assert_matches(deltaspec.load(folder), exp)


def test_lazy_until_asked(llama_lora, llama, store_reads):
    adapter, _ = llama_lora
    calls = store_reads
    deltas = deltaspec.load(adapter, llama[1])
    assert calls == []
    next(iter(deltas.values())).factors()
    assert len(calls) == 2


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "lora_ga", "loftq"])
def test_base_modifying_init_is_refused(tmp_path, llama_lora, init):
    adapter, _ = llama_lora
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"init_lora_weights": init}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedError, match=r"adapter_config\.json.*init_lora_weights"):
        deltaspec.load(folder)
    assert deltaspec.load(folder, allow_modified_base=True)


@pytest.mark.parametrize("init", ["eva", "gaussian", "orthogonal", True, False])
def test_base_preserving_init_is_read(tmp_path, llama_lora, init):
    adapter, pm = llama_lora
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"init_lora_weights": init}
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert len(deltaspec.load(folder)) == 14


def test_pissa_refused_then_converted_adapter_is_the_true_update(tmp_path, llama):
    """PiSSA moved s·B₀A₀ out of W; PEFT's conversion re-saves the true update of the ORIGINAL base."""
    from peft import LoraConfig, get_peft_model

    model, base = llama
    torch.manual_seed(3)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                         target_modules=["q_proj", "down_proj"]))
    pm.peft_config["default"].init_lora_weights = True
    pm.save_pretrained(tmp_path / "pissa_init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    with torch.no_grad():  # "training"
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "pissa")
    with pytest.raises(UnsupportedError, match="adapter_config.json"):
        deltaspec.load(tmp_path / "pissa", base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "converted",
                           path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    truth = F.expected_deltas(model, pm)  # PiSSA model merged, minus the ORIGINAL base
    deltas = deltaspec.load(tmp_path / "converted", base)
    assert_matches(deltas, truth)
    assert all(d.rank_bound == 8 for d in deltas.values())


def test_other_peft_types_are_unsupported(tmp_path, llama):
    from peft import HRAConfig, get_peft_model

    model, _ = llama
    get_peft_model(copy.deepcopy(model), HRAConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "a")
    with pytest.raises(UnsupportedError, match=r"adapter_config\.json: peft_type 'HRA' is not "
                                               r"supported \(deltaspec reads LORA, ADALORA"):
        deltaspec.load(tmp_path / "a")


def test_unknown_keys_are_reported_not_dropped(tmp_path, llama_lora):
    from safetensors.torch import load_file, save_file

    adapter, _ = llama_lora
    folder = tmp_path / "a"
    folder.mkdir()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_mystery"] = torch.ones(2)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    deltas = deltaspec.load(folder)
    assert len(deltas) == 14
    assert [k for k, _ in deltas.skipped] == ["base_model.model.model.layers.0.self_attn.q_proj.lora_mystery"]


def test_missing_factor_names_the_module(tmp_path, llama_lora):
    from safetensors.torch import load_file, save_file

    adapter, _ = llama_lora
    folder = tmp_path / "a"
    folder.mkdir()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj.*lora_B"):
        deltaspec.load(folder)


KEY_LAYOUT = [  # (LoraConfig keywords, a key PEFT 0.21 writes, its shape) on the tiny Llama
    ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj.lora_A.weight", (4, 32)),
    ({"target_modules": ["embed_tokens"]}, "model.embed_tokens.lora_embedding_A", (4, 64)),
    ({"target_modules": ["embed_tokens"]}, "model.embed_tokens.lora_embedding_B", (32, 4)),
    ({"target_modules": ["embed_tokens"]}, "model.embed_tokens.base_layer.weight", (64, 32)),
    ({"target_modules": ["q_proj"], "use_dora": True},
     "model.layers.0.self_attn.q_proj.lora_magnitude_vector", (32,)),
    ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "lm_head.weight", (64, 32)),
    ({"target_modules": ["q_proj"], "trainable_token_indices": [1, 2]},
     "model.embed_tokens.token_adapter.trainable_tokens_delta", (2, 32)),
]


@pytest.mark.parametrize(("kw", "key", "shape"), KEY_LAYOUT)
def test_peft_key_layout(tmp_path, llama, kw, key, shape):
    """The key names the loader's regexes are written for (adapter name stripped on save)."""
    folder, _ = F.lora_adapter(llama[0], tmp_path / "a", r=4, **kw)
    store = TensorStore.from_files([folder / "adapter_model.safetensors"])
    assert store.shape("base_model.model." + key) == shape
    assert not [k for k in store if ".default" in k]
