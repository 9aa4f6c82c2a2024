"""The MTL-LoRA code base's ``checkpoint/final_checkpoint.pt`` (pUmpKin-Co/MTL-LoRA).

Checkpoints are written the way its ``save_pretrain`` writes them (``torch.save`` of every state-dict
key containing "lora", no config); ΔW is checked against an independent re-implementation of each
adapter class's forward pass (the LoRA part of the output at x = I is ΔWᵀ), singular values
against float64 numpy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as Fn
from click.testing import CliRunner

import deltaspec
from deltaspec.cli import main
from deltaspec.errors import CheckpointError, UsageError

MODS = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.k_proj": (16, 32),
        "model.layers.1.self_attn.q_proj": (32, 32)}


def _save(tmp_path, sd: dict) -> tuple:
    ckpt = tmp_path / "out" / "checkpoint"
    ckpt.mkdir(parents=True)
    torch.save(sd, ckpt / "final_checkpoint.pt")
    return ckpt, ckpt / "final_checkpoint.pt"


def _eye(d_in: int) -> torch.Tensor:
    return torch.eye(d_in, dtype=torch.float64)[None]  # a batch of one sequence: x = I


# ---- independent forwards of the code base's layers (the adapter's part of the output) ------

def multilora_forward(x, a, b, s, scaling):
    """MultiLoRALinear.forward minus the base: einsum over the stacked A, per-module B and s."""
    immediate = torch.einsum("bsd,ndr->bsnr", x, a.permute(0, 2, 1)).permute(2, 0, 1, 3)
    out = 0
    for i in range(a.shape[0]):
        out = out + (immediate[i] @ b[i].permute(1, 0) * s[i].unsqueeze(0).unsqueeze(0)) * scaling
    return out


def mlora_forward(x, task, t, scaling, tau, diagonal):
    """mLoRALinear.forward minus the base, for lambda_index = task."""
    index = torch.tensor([task])
    lora_a = torch.index_select(t["lora_A"].double(), 0, torch.zeros_like(index))
    lambdas = torch.index_select(t["lora_lambdas"].double(), 0, index)
    if diagonal:
        lambdas = torch.diag_embed(lambdas)
    w = Fn.softmax(t["lora_B_w"].float() / tau, dim=-1, dtype=torch.float32)
    w = w.to(t["lora_B"].dtype).double()
    n_b, d_out, r = t["lora_B"].shape
    task_b = (w @ t["lora_B"].double().view((n_b, -1))).reshape((-1, d_out, r))
    lora_b = torch.index_select(task_b, 0, index)
    after_a = torch.bmm(torch.bmm(x, lora_a.transpose(-2, -1)), lambdas.transpose(-2, -1))
    tunable = torch.sigmoid(t["lora_scaler"].double()).item() if "lora_scaler" in t else 1.0
    return torch.bmm(after_a, lora_b.transpose(-2, -1)) * scaling * tunable


def moelora_forward(x, task, t, experts, scaling):
    """MMOELoraLinear.forward minus the base: task embedding → gate → weighted experts."""
    emb = t["lora_task_embedding.weight"].double()[torch.tensor([task])]
    weight = torch.softmax(emb @ t["lora_gate.GateL.weight"].double().T, dim=1)
    out = 0
    for i in range(experts):
        a = t[f"lora_A.loraA.{i}.mlp.weight"].double()
        b = t[f"lora_B.loraB.{i}.mlp.weight"].double()
        out = out + (x @ a.T) @ b.T * scaling * weight[..., i].unsqueeze(-1).unsqueeze(-1)
    return out


def dora_forward(x, w, a, b, m, scaling):
    """DoRALinear.forward minus x·Wᵀ (no bias), Wdecompose=False."""
    new_v = w + (b @ a) * scaling
    norm_scale = m.view(-1) / torch.linalg.norm(new_v, dim=1)
    org = x @ w.T
    return org + (norm_scale - 1) * org + norm_scale * ((x @ a.T) @ b.T) * scaling - org


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _check_spectrum(d, want: torch.Tensor) -> None:
    sv = np.linalg.svd(want.numpy(), compute_uv=False)
    got = deltaspec.spectrum(d).values.double().numpy()[: len(sv)]
    assert np.abs(got - sv).max() <= 1e-6 * sv[0]


# ---- builders: tensors as each class initialises/learns them, keys as state_dict() names -----

def multilora_sd(n=3, r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (d_out, d_in) in MODS.items():
        sd[f"{mod}.lora_A"] = torch.randn(n, r, d_in, generator=g).to(dtype)
        sd[f"{mod}.lora_B"] = torch.randn(n, d_out, r, generator=g).to(dtype)
        sd[f"{mod}.lora_scaling"] = torch.randn(n, d_out, generator=g).to(dtype)
    return sd


def mlora_sd(tasks=4, n_b=3, r=4, diagonal=False, scaler=False, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (d_out, d_in) in MODS.items():
        lam = torch.randn(tasks, r, generator=g) if diagonal else torch.randn(tasks, r, r, generator=g)
        sd |= {f"{mod}.lora_A": torch.randn(1, r, d_in, generator=g).to(dtype),
               f"{mod}.lora_lambdas": lam.to(dtype),
               f"{mod}.lora_B": torch.randn(n_b, d_out, r, generator=g).to(dtype),
               f"{mod}.lora_B_w": torch.randn(tasks, n_b, generator=g).to(dtype)}
        if scaler:
            sd[f"{mod}.lora_scaler"] = torch.randn((), generator=g).to(dtype)
    return sd


def moelora_sd(experts=2, r=4, tasks=3, te=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (d_out, d_in) in MODS.items():
        for i in range(experts):
            a = torch.randn(r // experts, d_in, generator=g)
            b = torch.randn(d_out, r // experts, generator=g)
            # Expert registers mlp.weight as its own .weight too: state_dict() holds both
            sd |= {f"{mod}.lora_A.loraA.{i}.weight": a, f"{mod}.lora_A.loraA.{i}.mlp.weight": a,
                   f"{mod}.lora_B.loraB.{i}.weight": b, f"{mod}.lora_B.loraB.{i}.mlp.weight": b}
        sd[f"{mod}.lora_task_embedding.weight"] = torch.randn(tasks + 1, te, generator=g)
        sd[f"{mod}.lora_gate.GateL.weight"] = torch.randn(experts, te, generator=g)
    return sd


def lora_sd(r=4, seed=3, dora_base=None):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod, (d_out, d_in) in MODS.items():
        sd[f"{mod}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
        sd[f"{mod}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.1
        if dora_base is not None:
            norm = dora_base[f"{mod}.weight"].norm(dim=1, keepdim=True)
            sd[f"{mod}.lora_weight_m_wdecomp.weight"] = norm * (1 + 0.2 * torch.rand(d_out, 1, generator=g))
    return sd


# ---- ΔW against the forward formulas --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multilora_baseline(tmp_path, dtype):
    n, r, alpha = 3, 4, 16.0
    sd = multilora_sd(n, r, dtype)
    folder, pt = _save(tmp_path, sd)
    for where in (folder, pt, folder.parent):
        deltas = deltaspec.load(where, lora_alpha=alpha)
        assert deltas.format == "mtl-lora" and set(deltas) == set(MODS) and deltas.notes == []
    for mod, (_, d_in) in MODS.items():
        a, b, s = (sd[f"{mod}.lora_{p}"].double() for p in ("A", "B", "scaling"))
        want = multilora_forward(_eye(d_in), a, b, s, alpha / r)[0].T
        d = deltas[mod]
        assert d.is_factored and d.method == "multilora" and d.rank_bound == min(n * r, *d.shape)
        assert _rel(d.dense(torch.float64), want) < 1e-5
        _check_spectrum(d, want)


def test_multilora_without_alpha_notes_unit_scale(tmp_path):
    sd = multilora_sd()
    folder, _ = _save(tmp_path, sd)
    plain, scaled = deltaspec.load(folder), deltaspec.load(folder, lora_alpha=12.0)
    assert len(plain.notes) == 1 and "α/r = 1" in plain.notes[0] and "--lora-alpha" in plain.notes[0]
    for mod in MODS:
        assert _rel(plain[mod].dense() * (12.0 / 4), scaled[mod].dense().double()) < 1e-6


@pytest.mark.parametrize(("diagonal", "scaler", "tau", "dtype"),
                         [(False, False, None, torch.float32), (True, True, 0.1, torch.float32),
                          (False, False, 0.1, torch.bfloat16)])
def test_mtl_lora_one_delta_per_task(tmp_path, diagonal, scaler, tau, dtype):
    tasks, r, alpha = 4, 4, 8.0
    sd = mlora_sd(tasks, 3, r, diagonal, scaler, dtype)
    folder, pt = _save(tmp_path, sd)
    deltas = deltaspec.load(pt, lora_alpha=alpha, mtl_temperature=tau)
    assert len(deltas) == tasks * len(MODS)
    assert any("temperature" in n for n in deltas.notes) == (tau is None)
    for mod, (_, d_in) in MODS.items():
        t = {k.rsplit(".", 1)[-1]: v for k, v in sd.items() if k.startswith(mod + ".")}
        for task in range(tasks):
            name = mod.replace(".self_attn.", f".self_attn.tasks.{task}.")
            want = mlora_forward(_eye(d_in), task, t, alpha / r, tau or 1.0, diagonal)[0].T
            d = deltas[name]
            assert d.method == "mtl-lora" and d.is_factored and d.rank_bound == r
            assert _rel(d.dense(torch.float64), want) < 1e-5, (name, _rel(d.dense(), want))
            _check_spectrum(d, want)


def test_mtl_lora_rows_parse_and_pair(tmp_path):
    folder, _ = _save(tmp_path, mlora_sd(tasks=2))
    df = deltaspec.analyze(folder, intruders=False)
    row = df.set_index("module").loc["model.layers.1.self_attn.tasks.1.q_proj"]
    assert row["layer"] == 1 and row["kind"] == "q_proj"
    cmp = deltaspec.compare(folder, folder, intruders=False)
    assert len(cmp) == 2 * len(MODS) and np.allclose(cmp["cosine"], 1.0)


def test_moelora_one_delta_per_task(tmp_path):
    experts, r, tasks, alpha = 2, 4, 3, 8.0
    sd = moelora_sd(experts, r, tasks)
    folder, _ = _save(tmp_path, sd)
    deltas = deltaspec.load(folder, lora_alpha=alpha)
    assert len(deltas) == tasks * len(MODS)  # the embedding's extra row is not a task
    for mod, (_, d_in) in MODS.items():
        t = {k[len(mod) + 1:]: v for k, v in sd.items() if k.startswith(mod + ".")}
        for task in range(tasks):
            d = deltas[mod.replace(".self_attn.", f".self_attn.tasks.{task}.")]
            want = moelora_forward(_eye(d_in), task, t, experts, alpha / r)[0].T
            assert d.method == "moelora" and _rel(d.dense(torch.float64), want) < 1e-5
            _check_spectrum(d, want)


def test_lora_baseline(tmp_path):
    r, alpha = 4, 16.0
    sd = lora_sd(r)
    folder, _ = _save(tmp_path, sd)
    deltas = deltaspec.load(folder, lora_alpha=alpha)
    for mod in MODS:
        want = (sd[f"{mod}.lora_B.weight"].double() @ sd[f"{mod}.lora_A.weight"].double()) * alpha / r
        assert deltas[mod].method == "lora" and _rel(deltas[mod].dense(), want) < 1e-5


def test_dora_baseline_with_base(tmp_path, llama):
    model, base = llama
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    r, alpha = 4, 8.0
    sd = lora_sd(r, dora_base=weights)
    folder, _ = _save(tmp_path, sd)
    with pytest.raises(UsageError, match="--base"):
        deltaspec.load(folder, lora_alpha=alpha)["model.layers.0.self_attn.q_proj"]
    with pytest.raises(UsageError, match="--lora-alpha"):
        deltaspec.load(folder, base)
    deltas = deltaspec.load(folder, base, lora_alpha=alpha)
    for mod, (_, d_in) in MODS.items():
        w = weights[f"{mod}.weight"].double()
        a, b = sd[f"{mod}.lora_A.weight"].double(), sd[f"{mod}.lora_B.weight"].double()
        m = sd[f"{mod}.lora_weight_m_wdecomp.weight"].double()
        want = dora_forward(_eye(d_in), w, a, b, m, alpha / r)[0].T
        assert deltas[mod].method == "dora" and _rel(deltas[mod].dense(), want) < 1e-5
        _check_spectrum(deltas[mod], want)


def test_dora_magnitude_only(tmp_path, llama):
    """Wdecompose=True: only the magnitude is trained, ΔW = (m/‖W‖_row − 1)·W."""
    model, base = llama
    mod = "model.layers.0.self_attn.q_proj"
    w = model.state_dict()[f"{mod}.weight"].detach().double()
    m = w.norm(dim=1, keepdim=True) * torch.linspace(0.5, 1.5, 32).double()[:, None]
    folder, _ = _save(tmp_path, {f"{mod}.lora_weight_m_wdecomp.weight": m.float()})
    d = deltaspec.load(folder, base)[mod]
    assert _rel(d.dense(), (m / w.norm(dim=1, keepdim=True) - 1) * w) < 1e-5


# ---- the CLI --------------------------------------------------------------------------------

def test_cli_on_folder_and_pt(tmp_path):
    folder, pt = _save(tmp_path, multilora_sd())
    for where in (folder, pt):
        res = CliRunner().invoke(main, ["analyze", str(where), "--format", "json"])
        assert res.exit_code == 0, res.output
        notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note:")]
        assert len(notes) == 1 and "α/r = 1" in notes[0]
    res = CliRunner().invoke(main, ["analyze", str(pt), "--lora-alpha", "16", "--format", "json"])
    assert res.exit_code == 0 and "α" not in res.stderr
    want = deltaspec.analyze(pt, lora_alpha=16.0, intruders=False)
    got = deltaspec.analyze(pt, intruders=False)
    assert np.allclose(got["fro_norm"] * 4, want["fro_norm"])
    assert np.allclose(got["normalized_entropy"], want["normalized_entropy"])


# ---- bad inputs -----------------------------------------------------------------------------

def _bad_shape(sd):
    sd["model.layers.0.self_attn.q_proj.lora_B"] = torch.randn(3, 32, 5)


def _missing(sd):
    del sd["model.layers.1.self_attn.q_proj.lora_scaling"]


def _unknown(sd):
    sd["model.layers.1.mlp.up_proj.lora_X"] = torch.randn(2)


def _task_mismatch(sd):
    sd["model.layers.0.self_attn.q_proj.lora_B_w"] = torch.randn(2, 3)


BAD = {"bad_shape": (multilora_sd, _bad_shape, "lora_B"),
       "missing_part": (multilora_sd, _missing, "lora_scaling"),
       "unknown_part": (multilora_sd, _unknown, "lora_X"),
       "task_mismatch": (mlora_sd, _task_mismatch, "lora_B_w")}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_are_one_line_errors(tmp_path, case):
    build, spoil, needle = BAD[case]
    sd = build()
    spoil(sd)
    folder, pt = _save(tmp_path, sd)
    with pytest.raises(CheckpointError) as info:
        deltaspec.load(folder)
    msg = str(info.value)
    assert "\n" not in msg and str(pt) in msg and needle in msg
    res = CliRunner().invoke(main, ["analyze", str(pt), "-q"])
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("deltaspec: error:")


def test_corrupt_pt_and_bad_options(tmp_path):
    folder, pt = _save(tmp_path, multilora_sd())
    with pytest.raises(UsageError, match="lora_alpha"):
        deltaspec.load(folder, lora_alpha=-1.0)
    with pytest.raises(UsageError, match="temperature"):
        deltaspec.load(folder, mtl_temperature=math.inf)
    res = CliRunner().invoke(main, ["analyze", str(pt), "--lora-alpha", "0"])
    assert res.exit_code == 2
    pt.write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="final_checkpoint.pt"):
        deltaspec.load(pt)
