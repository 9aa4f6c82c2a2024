"""Tests of the bundled MultiLoRA training reference (deltaspec.reference)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import deltaspec  # the loader side of the loader↔trainer contract (deltaspec.load must exist)
from deltaspec.reference import (
    AdapterConfig,
    DataConfig,
    DeltaspecReferenceLM,
    LoRALinear,
    ModelConfig,
    MultiLoRALinear,
    TrainConfig,
    apply_adapters,
    build_mixture,
    lora_num_params,
    merge_adapters,
    multilora_num_params,
    run_all,
)
from deltaspec.reference.export import load_full_checkpoint, save_multilora, save_peft_lora

IN, OUT, N, R, ALPHA = 24, 40, 3, 2, 6.0


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def _multilora_reference(layer: MultiLoRALinear) -> torch.Tensor:
    """Σᵢ diag(sᵢ)·Bᵢ·Aᵢ·α/r, computed module by module in float64 (independent of the layer)."""
    a, b = layer.lora_A.detach().double(), layer.lora_B.detach().double()
    s = layer.lora_scaling.detach().double()
    total = torch.zeros(layer.base.out_features, layer.base.in_features, dtype=torch.float64)
    for i in range(layer.n):
        scale_rows = s[i] * torch.ones(layer.base.out_features, dtype=torch.float64)
        total += torch.diag(scale_rows) @ b[i] @ a[i]
    return total * layer.alpha / layer.r


@pytest.mark.parametrize("scaling_shape", ["n", "n_out"])
def test_multilora_zero_at_init_and_merge_matches_float64(scaling_shape: str) -> None:
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    w0 = base.weight.detach().clone()
    layer = MultiLoRALinear(base, n=N, r=R, alpha=ALPHA, scaling_shape=scaling_shape)
    x = torch.randn(5, IN)
    assert torch.equal(layer.delta_weight(), torch.zeros(OUT, IN))
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # both A and B random
    assert torch.count_nonzero(layer.lora_B) == layer.lora_B.numel()
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(IN)  # Kaiming-uniform a=√5: 1/√fan_in
    assert layer.lora_B.abs().max() <= 1 / math.sqrt(R)
    with torch.no_grad():
        layer.lora_scaling.normal_()
    expected = _multilora_reference(layer)
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-5, atol=1e-6)
    merged = layer.merge()
    assert type(merged) is nn.Linear
    torch.testing.assert_close((merged.weight.double() - w0.double()), expected,
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    n_scaling = N if scaling_shape == "n" else N * OUT
    assert layer.lora_scaling.shape == ((N,) if scaling_shape == "n" else (N, OUT))
    assert layer.num_trainable_parameters() == N * R * (IN + OUT) + n_scaling
    assert multilora_num_params(IN, OUT, N, R, scaling_shape) == N * R * (IN + OUT) + n_scaling


def test_lora_zero_at_init_and_merge_matches_float64() -> None:
    torch.manual_seed(1)
    base = nn.Linear(IN, OUT, bias=False)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=R, alpha=ALPHA)
    assert torch.equal(layer.delta_weight(), torch.zeros(OUT, IN))
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = layer.lora_B.detach().double() @ layer.lora_A.detach().double() * ALPHA / R
    torch.testing.assert_close(layer.delta_weight().double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.merge().weight.double() - w0.double(), expected,
                               rtol=1e-5, atol=1e-6)
    x = torch.randn(3, IN)
    torch.testing.assert_close(layer.merge()(x), layer(x), rtol=1e-5, atol=1e-5)
    assert layer.num_trainable_parameters() == R * (IN + OUT) == lora_num_params(IN, OUT, R)
    assert all(not p.requires_grad for p in layer.base.parameters())


def _tiny_model_config() -> ModelConfig:
    return ModelConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32)


@pytest.mark.parametrize("scaling_shape", ["n", "n_out"])
def test_match_params_gives_lora_rank_n_times_r(scaling_shape: str) -> None:
    cfg = AdapterConfig(n=4, r=2, scaling_shape=scaling_shape, match_params=True)
    assert cfg.lora_rank() == 8
    assert AdapterConfig(n=4, r=2, match_params=False).lora_rank() == 2
    counts = {}
    for method in ("lora", "multilora"):
        model = DeltaspecReferenceLM(_tiny_model_config())
        r = cfg.lora_rank() if method == "lora" else cfg.r
        layers = apply_adapters(model, method, cfg.target_modules, r=r, n=cfg.n,
                                scaling_shape=scaling_shape)
        counts[method] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts[method] == sum(m.num_trainable_parameters() for m in layers.values())
        assert len(layers) == 2 * 7
    scalings = sum(4 if scaling_shape == "n" else 4 * out
                   for out in [16, 16, 16, 16, 32, 32, 16] * 2)
    assert counts["lora"] == counts["multilora"] - scalings


def test_apply_and_merge_adapters_keeps_function() -> None:
    torch.manual_seed(2)
    model = DeltaspecReferenceLM(_tiny_model_config())
    ids = torch.randint(3, 80, (2, 7))
    before = model(ids)
    layers = apply_adapters(model, "multilora", ("q_proj", "down_proj"), r=2, n=3)
    assert torch.equal(model(ids), before)  # ΔW = 0 at init
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_scaling.normal_()
    adapted = model(ids)
    merge_adapters(model, layers)
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(model(ids), adapted, rtol=1e-4, atol=1e-5)


def test_mixture_splits_are_disjoint_and_seeded() -> None:
    cfg = DataConfig(n_train_per_task=200, n_heldout_per_task=16)
    a, b = build_mixture(cfg), build_mixture(cfg)
    assert a.train == b.train and a.heldout == b.heldout and a.pretrain_lines == b.pretrain_lines
    for task in a.train:
        assert len(a.heldout[task]) > 0
        train_prompts = {e.prompt for e in a.train[task]}
        assert not train_prompts & {e.prompt for e in a.heldout[task]}, task
        assert all(e.answer for e in a.train[task] + a.heldout[task])
    held = set(a.heldout_countries)
    asked = {re.search(r"capital of (\w+)\?", e.prompt).group(1) for e in a.heldout["capital"]}
    assert asked == held
    questioned = {re.search(r"capital of (\w+)\?", e.prompt).group(1)
                  for e in a.train["capital"] if e.prompt.startswith("what")}
    assert questioned and not questioned & held
    corpus = " ".join(a.pretrain_lines)
    assert all(f"the capital of {c} is {a.facts[c]}." in corpus for c in held)
    other = build_mixture(DataConfig(seed=1, n_train_per_task=20, n_heldout_per_task=4,
                                     n_pretrain_lines=5))
    assert other.facts != a.facts


def _tiny_run(out: Path) -> dict:
    steps = TrainConfig(steps=3, batch_size=4, warmup_steps=1, seq_len=32)
    data = DataConfig(n_pretrain_lines=200, n_train_per_task=40, n_heldout_per_task=4)
    return run_all(out, model_config=_tiny_model_config(), data_config=data,
                   pretrain_config=steps, finetune_configs=dict.fromkeys(
                       ("lora", "multilora", "full"), steps),
                   adapter=AdapterConfig(n=2, r=2, scaling_shape="n_out"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    return out, _tiny_run(out)


def _llama_keys(layers: int) -> set[str]:
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        p = f"model.layers.{i}."
        keys |= {f"{p}self_attn.{m}_proj.weight" for m in "qkvo"}
        keys |= {f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
        keys |= {f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"}
    return keys


def test_run_all_writes_full_checkpoints(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    for name in ("base", "full"):
        cfg = json.loads((out / name / "config.json").read_text())
        assert cfg["model_type"] == "deltaspec-reference"
        assert cfg["architectures"] == ["DeltaspecReferenceLM"]
        assert cfg["tie_word_embeddings"] is False
        for k, v in _tiny_model_config().to_dict().items():
            assert cfg[k] == v
        tensors = _read(out / name / "model.safetensors")
        assert set(tensors) == _llama_keys(2)
        assert all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors.values())
        assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (32, 16)
        assert tensors["lm_head.weight"].shape == (80, 16)
    assert not list(out.rglob(".*.tmp-*"))  # no temporary files left


def test_run_all_writes_peft_lora(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    cfg = json.loads((out / "lora" / "adapter_config.json").read_text())
    targets = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert cfg == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 4,
        "target_modules": targets, "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "init_lora_weights": True,
        "base_model_name_or_path": str((out / "base").resolve()),
    }
    tensors = _read(out / "lora" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2
    a = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (16, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().sum() > 0


def test_run_all_writes_multilora(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    cfg = json.loads((out / "multilora" / "multilora_config.json").read_text())
    assert cfg == {
        "format": "multilora", "version": 1, "n": 2, "r": 2, "lora_alpha": 2,
        "scaling_shape": "n_out",
        "target_modules": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                           "v_proj"],
        "base_model_name_or_path": str((out / "base").resolve()),
    }
    tensors = _read(out / "multilora" / "multilora_model.safetensors")
    assert len(tensors) == 2 * 7 * 3
    p = "model.layers.0.mlp.up_proj"
    assert tensors[f"{p}.lora_A"].shape == (2, 2, 16)
    assert tensors[f"{p}.lora_B"].shape == (2, 32, 2)
    assert tensors[f"{p}.lora_scaling"].shape == (2, 32)
    assert tensors[f"{p}.lora_scaling"].abs().sum() > 0  # the scalings trained away from zero


def test_run_all_metrics(tiny_run: tuple[Path, dict]) -> None:
    out, results = tiny_run
    assert set(results) == {"base", "lora", "multilora", "full"}
    for name in ("base", "lora", "multilora", "full"):
        m = json.loads((out / name / "metrics.json").read_text())
        for key in ("loss", "accuracy", "accuracy_mean", "tokens_per_s", "peak_memory_mb",
                    "trainable_params", "wall_time_s", "config"):
            assert key in m, (name, key)
        assert set(m["accuracy"]) == {"reverse", "upper", "sort", "repeat", "parity",
                                      "sentiment", "capital"}
        assert m["tokens_per_s"] > 0 and m["peak_memory_mb"] > 0
    lora, multi = results["lora"], results["multilora"]
    assert lora["trainable_params"] == lora["trainable_params_formula"]
    assert multi["trainable_params"] == multi["trainable_params_formula"]
    scalings = 2 * sum([16, 16, 16, 16, 32, 32, 16]) * 2  # n_out scaling: n·out per layer
    assert lora["trainable_params"] == multi["trainable_params"] - scalings


def test_pretrain_cache_is_reused(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    again = _tiny_run(out)
    assert again["base"]["cached"] is True


def test_saved_adapters_reproduce_merged_delta(tmp_path: Path) -> None:
    torch.manual_seed(3)
    for method in ("lora", "multilora"):
        model = DeltaspecReferenceLM(_tiny_model_config())
        layers = apply_adapters(model, method, ("q_proj", "up_proj"), r=2, n=3, alpha=3.0)
        for layer in layers.values():
            with torch.no_grad():
                for p in layer.parameters():
                    if p.requires_grad:
                        p.normal_()
        save = save_peft_lora if method == "lora" else save_multilora
        save(layers, tmp_path / method, "base", ["q_proj", "up_proj"])
        name = "adapter_model" if method == "lora" else "multilora_model"
        t = _read(tmp_path / method / f"{name}.safetensors")
        for path, layer in layers.items():
            if method == "lora":
                a = t[f"base_model.model.{path}.lora_A.weight"].double()
                dw = t[f"base_model.model.{path}.lora_B.weight"].double() @ a * 3.0 / 2
            else:
                a, b = t[f"{path}.lora_A"].double(), t[f"{path}.lora_B"].double()
                s = t[f"{path}.lora_scaling"].double()
                dw = sum(s[i] * b[i] @ a[i] for i in range(3)) * 3.0 / 2
            torch.testing.assert_close(dw, layer.delta_weight().double(), rtol=1e-5, atol=1e-6)


def test_loaded_base_matches_saved(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    model, cfg = load_full_checkpoint(out / "base")
    assert cfg["num_hidden_layers"] == 2
    ids = torch.randint(3, 80, (1, 5))
    assert model(ids).shape == (1, 5, 80)


def _load_adapters_into_layers(out: Path, method: str) -> dict:
    """Rebuild the trained adapter layers on the saved base from the saved adapter tensors."""
    model, _ = load_full_checkpoint(out / "base")
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    if method == "lora":
        layers = apply_adapters(model, "lora", targets, r=4)
        t = _read(out / "lora" / "adapter_model.safetensors")
        for path, layer in layers.items():
            layer.lora_A.data.copy_(t[f"base_model.model.{path}.lora_A.weight"])
            layer.lora_B.data.copy_(t[f"base_model.model.{path}.lora_B.weight"])
        return layers
    layers = apply_adapters(model, "multilora", targets, r=2, n=2, scaling_shape="n_out")
    t = _read(out / "multilora" / "multilora_model.safetensors")
    for path, layer in layers.items():
        for name in ("lora_A", "lora_B", "lora_scaling"):
            getattr(layer, name).data.copy_(t[f"{path}.{name}"])
    return layers


@pytest.mark.parametrize("method", ["lora", "multilora"])
def test_deltaspec_load_reads_adapters(tiny_run: tuple[Path, dict], method: str) -> None:
    out, _ = tiny_run
    layers = _load_adapters_into_layers(out, method)
    deltas = deltaspec.load(out / method)
    assert set(deltas) == set(layers)
    for name, layer in layers.items():
        d = deltas[name]
        assert d.is_factored and d.shape == tuple(layer.base.weight.shape)
        assert d.rank_bound <= 4  # n·r = 2·2 for MultiLoRA, rank 4 for LoRA
        merged = layer.merge().weight.double() - layer.base.weight.double()
        torch.testing.assert_close(d.dense(torch.float64), merged, rtol=1e-4, atol=1e-6)


def test_deltaspec_load_reads_full_with_base(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    base, full = _read(out / "base" / "model.safetensors"), _read(out / "full" / "model.safetensors")
    deltas = deltaspec.load(out / "full", base=out / "base")
    assert "model.layers.0.self_attn.q_proj" in deltas
    for name, d in deltas.items():
        key = f"{name}.weight"
        torch.testing.assert_close(d.dense(), full[key] - base[key], rtol=0, atol=1e-7)


@pytest.mark.slow
def test_teacher_forced_exact_match_equals_greedy_generation(tmp_path: Path) -> None:
    from deltaspec.reference import CharTokenizer, finetune, greedy_generate, pretrain
    from deltaspec.reference.configs import quick_data_config
    from deltaspec.reference.evaluate import exact_match

    pretrain(tmp_path / "base", quick=True)
    finetune("full", tmp_path / "base", tmp_path / "full", quick=True)
    model, _ = load_full_checkpoint(tmp_path / "full")
    tok, mix = CharTokenizer(), build_mixture(quick_data_config(0))
    examples = [e for exs in mix.heldout.values() for e in exs]
    outs = greedy_generate(model.eval(), [[tok.bos_id, *tok.encode(e.prompt)] for e in examples],
                           max_new_tokens=20, eos_id=tok.eos_id, pad_id=tok.pad_id)
    agree = right = 0
    for e, o in zip(examples, outs, strict=True):
        ids = [tok.bos_id, *tok.encode(e.prompt)]
        tf = exact_match(model, [([*ids, *tok.encode(e.answer), tok.eos_id], len(ids))], 0)
        gen = tok.decode(o) == e.answer and len(o) == len(e.answer)
        agree += int(tf == float(gen))
        right += int(gen)
    assert agree == len(examples)
    assert 0 < right < len(examples)  # a mix of right and wrong answers, so the check has teeth
