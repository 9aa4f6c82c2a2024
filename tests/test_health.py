"""Health columns: untrained (LoRA B = 0, frozen full-FT tensors), lost_in_bf16 / bf16_merge_error
against a float64 numpy computation, heavy-tail α against the ``powerlaw`` package, the note and
the gate rule — on genuine checkpoints built with transformers + peft."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import deltaspec
from deltaspec.cli import main
from deltaspec.errors import UsageError
from deltaspec.metrics import health as H
from deltaspec.metrics.heavy_tail import alpha, esd, fit_power_law

ZEROED = ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
          "model.layers.0.self_attn.v_proj")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def half_trained(tmp_path_factory, llama):
    """A PEFT LoRA (q, v) whose B is zero in three of its four modules."""
    from peft import LoraConfig, get_peft_model

    model, _ = llama
    torch.manual_seed(5)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                         target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name and any(z + "." in name for z in ZEROED):
                p.zero_()
    folder = tmp_path_factory.mktemp("half_trained")
    pm.save_pretrained(folder)
    return folder


def test_untrained_lora_modules_and_the_note(half_trained, llama):
    df = deltaspec.analyze(half_trained, discover_base=False)
    got = dict(zip(df["module"], df["untrained"], strict=True))
    assert got == {m: int(m in ZEROED) for m in got} and len(got) == 4
    assert df.attrs["notes"][-1] == "3 of 4 modules have B = 0: this adapter never trained there"
    for extra in ((), ("--base", llama[1])):  # the torch-free route and the full one
        r = cli("analyze", half_trained, "--no-base-discovery", "--format", "csv", *extra)
        assert r.exit_code == 0, r.output
        assert "note: 3 of 4 modules have B = 0: this adapter never trained there" in r.output


def test_frozen_full_finetune_tensors(tmp_path, llama):
    model, base = llama
    ft = copy.deepcopy(model)
    with torch.no_grad():
        ft.model.layers[0].mlp.up_proj.weight.add_(0.01)
    ft.save_pretrained(tmp_path)
    df = deltaspec.analyze(tmp_path, base=base)
    trained = set(df.loc[df["untrained"] == 0, "module"])
    assert trained == {"model.layers.0.mlp.up_proj"}
    n = len(df)
    assert df.attrs["notes"][-1] == (f"{n - 1} of {n} modules are bit-identical to the base: "
                                     "frozen in this fine-tune")


def test_check_gates_on_untrained(half_trained, tmp_path):
    baseline = tmp_path / "baseline.json"
    assert cli("snapshot", half_trained, "--out", baseline, "--no-base-discovery", "-q").exit_code == 0
    assert cli("check", half_trained, "-b", baseline, "--no-base-discovery", "-q").exit_code == 0
    rules = tmp_path / "rules.toml"
    rules.write_text("[bounds]\nuntrained = '<= 0'\n")
    r = cli("check", half_trained, "-b", baseline, "-r", rules, "--no-base-discovery", "-q")
    assert r.exit_code == 1 and "untrained" in r.output and ZEROED[0] in r.output


# ---- lost_in_bf16 / bf16_merge_error: float64 numpy, element by element -----------------------

P_EMIN = {"bfloat16": (8, -126), "float16": (11, -14)}


def np_ulp(x, dtype):
    p, e_min = P_EMIN[dtype]
    _, e = np.frexp(x)
    e = np.maximum(np.where(x == 0, e_min, e - 1), e_min)
    return np.ldexp(1.0, e - p + 1)


def np_round(x, dtype):
    q = np_ulp(x, dtype)
    return np.round(x / q) * q  # numpy: half to even


def test_round_to_is_a_single_correct_rounding():
    # float32 → bf16/fp16 by torch rounds once, correctly: the oracle for float32 inputs
    x = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3
    x = torch.cat([x, torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 2.0**-130, 0.0, -1.5])])
    for dtype, tdt in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        x64 = x.double() if dtype == "bfloat16" else (x / 8).double()
        want = x64.float().to(tdt).double()
        assert torch.equal(H.round_to(x64, dtype), want)
        assert np.array_equal(np_round(x64.numpy(), dtype), want.numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_merge_columns_equal_a_float64_numpy_computation(llama, half_trained, dtype):
    model, base = llama
    df = deltaspec.analyze(half_trained, base=base, merge_dtype=dtype).set_index("module")
    sd = load_file(str(half_trained / "adapter_model.safetensors"))
    cfg = json.loads((half_trained / "adapter_config.json").read_text())
    s = np.float32(cfg["lora_alpha"] / cfg["r"])
    weights = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        key = f"base_model.model.{module}"
        b = (sd[f"{key}.lora_B.weight"] * s).astype(np.float64)  # B·s in float32, as the loader
        dw = b @ sd[f"{key}.lora_A.weight"].astype(np.float64)
        w = weights[f"{module}.weight"]
        lost = np.mean(np.abs(dw) < np_ulp(w, dtype) / 2)
        row = df.loc[module]
        assert row["lost_in_bf16"] == pytest.approx(lost, abs=1e-12)
        if not dw.any():
            assert row["lost_in_bf16"] == 1.0 and math.isnan(row["bf16_merge_error"])
            continue
        err = np.linalg.norm(np_round(w + dw, dtype) - w - dw) / np.linalg.norm(dw)
        assert row["bf16_merge_error"] == pytest.approx(err, rel=1e-9)
        assert 0 < err < 0.05


def test_a_small_update_is_lost_in_bf16(tmp_path, llama):
    model, base = llama  # a full fine-tune whose update sits below half a bf16 ulp of most weights
    ft = copy.deepcopy(model)
    with torch.no_grad():
        w = ft.model.layers[0].mlp.down_proj.weight
        w.add_(w.abs() * 2**-10 * torch.sign(torch.randn(w.shape)))
    ft.save_pretrained(tmp_path)
    row = deltaspec.analyze(tmp_path, base=base, include="layers.0.mlp.down_proj").iloc[0]
    assert row["lost_in_bf16"] > 0.95 and row["bf16_merge_error"] > 0.9
    assert deltaspec.analyze(tmp_path, base=base, include="layers.0.mlp.down_proj",
                             merge_dtype="float16").iloc[0]["lost_in_bf16"] < 0.05
    with pytest.raises(UsageError, match="merge_dtype"):
        deltaspec.analyze(tmp_path, base=base, merge_dtype="float8")


# ---- heavy-tail α: the powerlaw package as the oracle ------------------------------------------

def powerlaw_alpha(lam):
    powerlaw = pytest.importorskip("powerlaw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(lam, verbose=False, parameter_ranges={"alpha": [1, None]}).alpha


@pytest.mark.parametrize("seed, shape", [(0, (160, 100)), (1, (90, 200))])
def test_alpha_matches_powerlaw(seed, shape):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) + 0.3 * rng.standard_t(2.5, shape)
    s = np.linalg.svd(w, compute_uv=False)
    lam = esd(s, shape)
    want = powerlaw_alpha(lam)
    assert alpha(s, shape) == pytest.approx(want, abs=0.05)
    assert fit_power_law(lam)[0] == pytest.approx(want, abs=1e-6)


def test_alpha_columns_of_a_full_finetune_and_its_base(llama, llama_full):
    model, base = llama
    df = deltaspec.analyze(llama_full, base=base, heavy_tail=True).set_index("module")
    assert "alpha" not in deltaspec.analyze(llama_full, base=base, include="q_proj").columns
    tuned = load_file(str(llama_full / "model.safetensors"))
    for module in ("model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        w = model.state_dict()[f"{module}.weight"].double().numpy()
        dw = tuned[f"{module}.weight"].astype(np.float64) - w
        for col, mat in (("alpha", dw), ("alpha_base", w)):
            lam = esd(np.linalg.svd(mat, compute_uv=False), mat.shape)
            assert df.loc[module, col] == pytest.approx(powerlaw_alpha(lam), abs=0.05), col


def test_cli_flags_alpha_and_merge_dtype(llama, llama_full):
    _, base = llama
    r = cli("analyze", llama_full, "--base", base, "--include", "up_proj", "--alpha",
            "--merge-dtype", "float16", "--format", "json", "-q")
    assert r.exit_code == 0, r.output
    got = {x["module"]: x for x in json.loads(r.output)}
    api = deltaspec.analyze(llama_full, base=base, include="up_proj", heavy_tail=True,
                            merge_dtype="float16").set_index("module")
    for module, x in got.items():
        for col in ("alpha", "alpha_base", "lost_in_bf16", "bf16_merge_error"):
            assert x[col] == pytest.approx(api.loc[module, col], rel=1e-12), col
    assert cli("analyze", llama_full, "--base", base, "--merge-dtype", "fp8").exit_code == 2


def test_bf16_full_finetune_fast_path_equals_the_float64_pass(tmp_path, llama):
    from deltaspec.engine.health import health_metrics, merge_rounding
    from deltaspec.engine.kernels import Operand

    model, _ = llama
    base16 = copy.deepcopy(model).to(torch.bfloat16)
    base16.save_pretrained(tmp_path / "base")
    ft = copy.deepcopy(base16)
    with torch.no_grad():  # an update of which about half the entries survive bf16
        w = ft.model.layers[0].mlp.up_proj.weight
        w.add_(w.float().abs().mul(2**-8 * 1.5).mul(torch.randint(0, 2, w.shape)).to(w.dtype))
    ft.save_pretrained(tmp_path / "ft")
    row = deltaspec.analyze(tmp_path / "ft", base=tmp_path / "base",
                            include="layers.0.mlp.up_proj").iloc[0]
    t, b = ft.model.layers[0].mlp.up_proj.weight.detach(), base16.model.layers[0].mlp.up_proj.weight
    assert row["lost_in_bf16"] == int((t == b).sum()) / t.numel() and 0.2 < row["lost_in_bf16"] < 0.8
    assert row["bf16_merge_error"] == 0.0
    cpu = torch.device("cpu")
    op = Operand(t.shape, cpu, "ΔW", dense=[(1.0, t), (-1.0, b.detach())])
    w_op = Operand(t.shape, cpu, "W", dense=[(1.0, b.detach().clone())])  # not the same tensor
    lost, entries, err2, _ = merge_rounding(w_op, op)
    assert lost / entries == row["lost_in_bf16"] and err2 == 0.0
    assert health_metrics(w_op, op, "bfloat16", False) == {"lost_in_bf16": lost / entries,
                                                           "bf16_merge_error": 0.0}
