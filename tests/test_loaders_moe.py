"""Mixture-of-LoRA experts: MixLoRA and HydraLoRA / LoRAMoE, one static ΔW per expert.

Adapters are written in each code base's layout (adapter_config.json + a torch.save'd key dict);
each expert's ΔW is checked against an independent forward of its LoRA branch at x = I.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import deltaspec
from deltaspec.cli import main
from deltaspec.errors import CheckpointError, UnsupportedError

ATTN = {"q_proj": (32, 32), "v_proj": (16, 32)}
MLP = {"gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48)}


def _branch(x, a, b, scaling):
    """A LoRA branch's output: lora_B(lora_A(x))·scaling (nn.Linear: x·Wᵀ)."""
    return (x @ a.T) @ b.T * scaling


def _delta_of(a, b, scaling):
    return _branch(torch.eye(a.shape[1], dtype=torch.float64), a.double(), b.double(), scaling).T


def _rel(got, want):
    return float((got.double() - want).norm() / want.norm())


def _write(folder, config, sd, name="adapter_model.bin"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    torch.save(sd, folder / name)
    return folder


def mixlora(folder, experts=3, r=4, expert_r=2, rslora=False):
    g = torch.Generator().manual_seed(0)
    config = {"peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "x",
              "r": r, "lora_alpha": 8, "lora_dropout": 0.05, "use_rslora": rslora,
              "target_modules": [*ATTN, *MLP], "routing_strategy": "mixtral",
              "num_experts": experts, "top_k": 2,
              "expert_lora": {"r": expert_r, "lora_alpha": 6, "lora_dropout": 0.05}}
    sd = {}
    for layer in range(2):
        for proj, (d_out, d_in) in ATTN.items():
            p = f"mixlora.layers.{layer}.self_attn.{proj}"
            sd[f"{p}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
            sd[f"{p}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
        sd[f"mixlora.layers.{layer}.gate.weight"] = torch.randn(experts, 32, generator=g)
        for e in range(experts):
            for proj, (d_out, d_in) in MLP.items():
                p = f"mixlora.layers.{layer}.experts.{e}.{proj}"
                sd[f"{p}.lora_A.weight"] = torch.randn(expert_r, d_in, generator=g)
                sd[f"{p}.lora_B.weight"] = torch.randn(d_out, expert_r, generator=g)
    return _write(folder, config, sd), config, sd


@pytest.mark.parametrize("rslora", [False, True])
def test_mixlora_experts(tmp_path, llama, rslora):
    model, base = llama
    folder, config, sd = mixlora(tmp_path / "mix", rslora=rslora)
    deltas = deltaspec.load(folder, base)
    assert deltas.format == "mixlora"
    assert len(deltas) == 2 * (len(ATTN) + 3 * len(MLP))
    assert {k for k, why in deltas.skipped if "router" in why} == {
        "mixlora.layers.0.gate.weight", "mixlora.layers.1.gate.weight"}
    weights = model.state_dict()

    def scale(alpha, r):
        return alpha / math.sqrt(r) if rslora else alpha / r

    for key in sd:
        if not key.endswith("lora_A.weight"):
            continue
        p = key.removesuffix(".lora_A.weight")
        layer, rest = p.split(".")[2], p.split(".", 3)[3]
        if rest.startswith("self_attn"):
            name, base_name, s = f"model.layers.{layer}.{rest}", f"model.layers.{layer}.{rest}", scale(8, 4)
        else:
            e, proj = rest.split(".")[1:]
            name = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
            base_name, s = f"model.layers.{layer}.mlp.{proj}", scale(6, 2)
        d = deltas[name]
        want = _delta_of(sd[key], sd[f"{p}.lora_B.weight"], s)
        assert _rel(d.dense(torch.float64), want) < 1e-5, name
        assert torch.equal(d.base(), weights[f"{base_name}.weight"])
        sv = np.linalg.svd(want.numpy(), compute_uv=False)
        got = deltaspec.spectrum(d).values.double().numpy()[: len(sv)]
        assert np.abs(got - sv).max() <= 1e-6 * sv[0]


def test_mixlora_rows_group_by_kind(tmp_path):
    folder, _, _ = mixlora(tmp_path / "mix")
    df = deltaspec.analyze(folder, intruders=False).set_index("module")
    row = df.loc["model.layers.1.mlp.experts.2.down_proj"]
    assert row["layer"] == 1 and row["kind"] == "down_proj" and row["method"] == "mixlora"


def _lora_moe(folder, shared: bool, experts=3, r=4):
    g = torch.Generator().manual_seed(1)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16,
              "lora_nums": experts, "blc_alpha": 0.0, "blc_weight": 0.0, "lora_dropout": 0.05,
              "target_modules": list(ATTN), "fan_in_fan_out": False, "bias": "none"}
    sd = {}
    for layer in range(2):
        for proj, (d_out, d_in) in ATTN.items():
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            sd[f"{p}.lora_route.weight"] = torch.randn(experts, d_in, generator=g)
            if shared:
                sd[f"{p}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
            for i in range(experts):
                if not shared:
                    sd[f"{p}.lora_A{i}.weight"] = torch.randn(r, d_in, generator=g)
                sd[f"{p}.lora_B{i}.weight"] = torch.randn(d_out, r, generator=g)
    return _write(folder, config, sd), sd


@pytest.mark.parametrize("shared", [True, False])
def test_hydralora_and_loramoe_experts(tmp_path, shared):
    folder, sd = _lora_moe(tmp_path / "hydra", shared)
    deltas = deltaspec.load(folder)
    assert deltas.format == "lora-moe" and len(deltas) == 2 * len(ATTN) * 3
    assert sum("router" in why for _, why in deltas.skipped) == 2 * len(ATTN)
    for layer in range(2):
        for proj in ATTN:
            p = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            for i in range(3):
                a = sd[f"{p}.lora_A.weight"] if shared else sd[f"{p}.lora_A{i}.weight"]
                d = deltas[f"model.layers.{layer}.self_attn.experts.{i}.{proj}"]
                assert d.method == ("hydralora" if shared else "loramoe")
                assert _rel(d.dense(torch.float64), _delta_of(a, sd[f"{p}.lora_B{i}.weight"], 16 / 4)) < 1e-5


def test_cli_lists_router_as_skipped(tmp_path):
    folder, _ = _lora_moe(tmp_path / "hydra", True)
    res = CliRunner().invoke(main, ["analyze", str(folder), "--format", "csv"])
    assert res.exit_code == 0 and "router" in res.stderr and "experts.2.q_proj" in res.stdout


def test_bad_moe_inputs(tmp_path):
    folder, sd = _lora_moe(tmp_path / "a", True)
    del sd["base_model.model.model.layers.0.self_attn.q_proj.lora_B1.weight"]
    torch.save(sd, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"adapter_model\.bin.*lora_B heads \[0, 2\]"):
        deltaspec.load(folder)
    folder, _, sd = mixlora(tmp_path / "b")
    sd["mixlora.layers.0.experts.1.up_proj.lora_B.weight"] = torch.randn(48, 3)
    torch.save(sd, folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match=r"experts\.1\.up_proj\.lora_B\.weight"):
        deltaspec.load(folder)["model.layers.0.mlp.experts.1.up_proj"]
    cfg = json.loads((folder / "adapter_config.json").read_text()) | {"use_dora": True}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["analyze", str(folder), "--no-base-discovery"])  # base "x"
    assert res.exit_code == 2 and "use_dora" in res.stderr and len(res.stderr.splitlines()) == 1
    with pytest.raises(UnsupportedError):
        deltaspec.load(folder)
