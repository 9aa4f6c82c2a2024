"""deltaspec zoo: many updates at once — against dense float64 numpy, PEFT's merge, gauge and scale
invariance, the chance level of φ, planted groups, bad input and the output folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import factories as F
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import deltaspec
from deltaspec.cli import main
from deltaspec.engine.collection import Member, module_stats
from deltaspec.errors import DeltaspecError, ShapeError, UsageError
from deltaspec.report.uncertainty import random_subspace_phi

CPU = torch.device("cpu")
MODS = {"self_attn.q_proj": (24, 16), "mlp.up_proj": (40, 16)}


def _reference(ws: list[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Every collection number from dense float64 numpy: np.sum for ⟨·,·⟩, np.linalg.svd for
    the vectors, principal angles from the SVD of Uₐᵀ U_b, the shared basis from eigvalsh."""
    n = len(ws)
    svd = [np.linalg.svd(w) for w in ws]
    ranks = [min(k, np.linalg.matrix_rank(w)) for w in ws]
    out = {x: np.zeros((n, n)) for x in ("inner", "phi_left", "phi_right", "angle_left", "angle_right")}
    for i in range(n):
        for j in range(n):
            out["inner"][i, j] = np.sum(ws[i] * ws[j])
            kab = min(ranks[i], ranks[j])
            for side, vec in (("left", lambda s: s[0]), ("right", lambda s: s[2].T)):
                ua, ub = vec(svd[i]), vec(svd[j])
                out[f"phi_{side}"][i, j] = np.sum((ua[:, :kab].T @ ub[:, :kab]) ** 2) / kab
                c = np.linalg.svd(ua[:, :ranks[i]].T @ ub[:, :ranks[j]], compute_uv=False)[0]
                out[f"angle_{side}"][i, j] = np.degrees(np.arccos(min(c, 1.0)))
    out["basis_left"] = np.sort(np.linalg.eigvalsh(sum(w @ w.T for w in ws)))[::-1]
    out["basis_right"] = np.sort(np.linalg.eigvalsh(sum(w.T @ w for w in ws)))[::-1]
    return out


def _check(st, ref: dict[str, np.ndarray]) -> None:
    off = ~np.eye(st.inner.shape[0], dtype=bool)
    assert np.allclose(st.inner, ref["inner"], rtol=1e-9, atol=1e-9 * np.abs(ref["inner"]).max())
    for side in ("left", "right"):
        assert np.abs(getattr(st, f"phi_{side}") - ref[f"phi_{side}"]).max() < 1e-9
        assert np.abs(getattr(st, f"angle_{side}")[off] - ref[f"angle_{side}"][off]).max() < 1e-9
        got, want = getattr(st, f"basis_{side}"), ref[f"basis_{side}"]
        size = min(got.size, want.size)
        assert np.abs(got[:size] - want[:size]).max() < 1e-9 * want[0]
        assert np.all(np.abs(got[size:]) < 1e-9 * want[0]) and np.all(np.abs(want[size:]) < 1e-9 * want[0])


def _factors(rng: np.random.Generator, m: int, n: int, r: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((m, r)), rng.standard_normal((r, n)) / math.sqrt(n)


@pytest.mark.parametrize("dense_at", [None, 1])
def test_pairwise_values_equal_dense_float64_numpy(dense_at, one_thread):
    """Different ranks (one below K), one update dense or none: every number to 1e-9."""
    rng = np.random.default_rng(0)
    m, n, k = 30, 22, 3
    fs = [_factors(rng, m, n, r) for r in (4, 2, 5, 4, 1)]
    ws = [b @ a for b, a in fs]
    members = [Member(dense=torch.tensor(ws[i])) if i == dense_at else
               Member(torch.tensor(b), torch.tensor(a)) for i, (b, a) in enumerate(fs)]
    st = module_stats(members, (m, n), k, CPU)
    _check(st, _reference(ws, k))
    assert st.k.tolist()[4] == [1, 1, 1, 1, 1]  # rank 1: every pair of it at K = 1


def test_gauge_and_scale_leave_cosine_and_phi_at_one(one_thread):
    rng = np.random.default_rng(1)
    b, a = _factors(rng, 32, 20, 6)
    g = rng.standard_normal((6, 6)) + 3 * np.eye(6)  # an invertible gauge
    variants = [(b, a), (b @ g, np.linalg.solve(g, a)), (2.5 * b, a), (-b, a)]
    st = module_stats([Member(torch.tensor(x), torch.tensor(y)) for x, y in variants], (32, 20), 4, CPU)
    cos = st.inner / np.sqrt(np.outer(np.diag(st.inner), np.diag(st.inner)))
    assert np.allclose(cos[0, :3], 1.0, atol=1e-12) and abs(cos[0, 3] + 1.0) < 1e-12
    assert np.allclose(st.phi_left, 1.0, atol=1e-10) and np.allclose(st.phi_right, 1.0, atol=1e-10)
    assert np.nanmax(st.angle_left) < 1e-4  # degrees: arccos near 1 keeps ~√ε


def test_independent_random_adapters_sit_at_the_chance_level(one_thread):
    rng = np.random.default_rng(2)
    m, n, k, count = 256, 128, 4, 12
    members = [Member(*(torch.tensor(x) for x in _factors(rng, m, n, k))) for _ in range(count)]
    st = module_stats(members, (m, n), k, CPU)
    pairs = np.triu_indices(count, 1)
    for side, dim in (("left", m), ("right", n)):
        phi = getattr(st, f"phi_{side}")[pairs]
        mean, sd = random_subspace_phi(dim, k)
        assert abs(phi.mean() - k / dim) < 4 * sd / math.sqrt(phi.size)  # E[φ] = K/m
    norms = np.sqrt(np.diag(st.inner))
    assert np.abs(st.inner[pairs] / (norms[pairs[0]] * norms[pairs[1]])).max() < 0.5


def _write_adapter(folder: Path, tensors: dict[str, tuple[np.ndarray, np.ndarray]], r: int) -> Path:
    """A PEFT LoRA folder (as PEFT saves it) with B·A·(α/r) = the given factors (α = r)."""
    folder.mkdir(parents=True)
    out = {}
    for name, (b, a) in tensors.items():
        out[f"base_model.model.{name}.lora_A.weight"] = torch.tensor(a, dtype=torch.float32).contiguous()
        out[f"base_model.model.{name}.lora_B.weight"] = torch.tensor(b, dtype=torch.float32).contiguous()
    save_file(out, str(folder / "adapter_model.safetensors"))
    kinds = sorted({n.rsplit(".", 1)[-1] for n in tensors})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": kinds}))
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """9 adapters in 3 planted groups (a shared centre per group plus noise), 2 layers × 2 kinds."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("zoo")
    names = [f"model.layers.{i}.{mod}" for i in range(2) for mod in MODS]
    centres = [{nm: _factors(rng, *MODS[nm.split(".", 3)[3]], 3) for nm in names} for _ in range(3)]
    folders, dense = {}, {}
    for j in range(9):
        c = centres[j % 3]
        fac = {nm: (b + 0.3 * rng.standard_normal(b.shape), a + 0.3 * rng.standard_normal(a.shape) / 4)
               for nm, (b, a) in c.items()}
        label = f"task{j}"
        folders[label] = _write_adapter(root / label, fac, 3)
        dense[label] = {nm: (torch.tensor(b, dtype=torch.float32).double() @
                             torch.tensor(a, dtype=torch.float32).double()).numpy()
                        for nm, (b, a) in fac.items()}
    return root, folders, dense


def test_planted_groups_are_recovered_and_tables_match_numpy(planted):
    root, folders, dense = planted
    res = deltaspec.zoo(sorted(map(str, folders.values())), k=2, device="cpu")
    assert res.tree.groups == 3
    found = res.clusters.groupby("group")["label"].apply(frozenset)
    assert set(found) == {frozenset(f"task{j}" for j in range(g, 9, 3)) for g in range(3)}
    # whole-model cosine against the concatenated dense updates
    flat = {lb: np.concatenate([d[nm].ravel() for nm in sorted(d)]) for lb, d in dense.items()}
    row = res.matrix.set_index(["a", "b"]).loc[("task0", "task4"), "cosine"]
    want = flat["task0"] @ flat["task4"] / np.linalg.norm(flat["task0"]) / np.linalg.norm(flat["task4"])
    assert abs(row - want) < 1e-9
    n, mods = len(folders), len(dense["task0"])
    assert len(res.pairs) == n * (n - 1) // 2 * mods and len(res.matrix) == n * n
    rows = res.pairs["module"].map(lambda s: MODS[s.split(".", 3)[3]][0])
    assert (res.pairs["chance_left"] == 2 / rows).all()
    # 3 centres of rank 3 plus small noise: ~9 shared directions keep 90 % of the energy
    assert (res.modules["basis_d90_left"] <= 12).all() and (res.modules["basis_dim_left"] > 12).all()


def test_peft_adapters_and_a_full_finetune_against_the_merge(tmp_path, llama):
    """Genuine PEFT adapters (tests/factories.py) and a full fine-tune: cosines equal PEFT's
    merged ΔW in float64."""
    model, base = llama
    targets = ["q_proj", "v_proj"]
    made = [F.lora_adapter(model, tmp_path / f"l{s}", seed=s, r=4, target_modules=targets)
            for s in (5, 6)]
    full = F.full_finetune(model, tmp_path / "full", seed=7)
    res = deltaspec.zoo({"a": made[0][0], "b": made[1][0], "full": full}, base=base,
                        include="q_proj|v_proj", device="cpu")
    da, db = (F.expected_deltas(model, pm) for _, pm in made)
    sd_full = {k.removesuffix(".weight"): v.double() for k, v in
               __import__("transformers").AutoModelForCausalLM.from_pretrained(full).state_dict().items()}
    sd_base = {k.removesuffix(".weight"): v.double() for k, v in model.state_dict().items()}
    for row in res.pairs.itertuples():
        key = next(k for k in da if k.endswith(row.module.removeprefix("model.")) or row.module.endswith(k))
        x = {"a": da[key], "b": db[key], "full": sd_full[key] - sd_base[key]}
        want = float((x[row.a] * x[row.b]).sum() / (x[row.a].norm() * x[row.b].norm()))
        assert abs(row.cosine - want) < 1e-6  # float32 checkpoints: PEFT merges in float32
    assert any("left out" in n for n in res.notes)  # the full fine-tune's other modules


def test_bad_input_is_one_line(tmp_path, planted):
    root, folders, _ = planted
    with pytest.raises(UsageError, match="at least two"):
        deltaspec.zoo([str(folders["task0"])])
    with pytest.raises(UsageError, match="given twice"):
        deltaspec.zoo({"a": folders["task0"], "A": folders["task1"]})
    other = _write_adapter(tmp_path / "other", {"model.layers.0.self_attn.q_proj":
                                                (np.ones((24, 2)), np.ones((2, 8)))}, 2)
    with pytest.raises(ShapeError, match=r"24×16 in .* but 24×8 in other"):
        deltaspec.zoo({"task0": folders["task0"], "other": other})
    with pytest.raises(DeltaspecError, match="update 'ghost'"):
        deltaspec.zoo({"task0": folders["task0"], "ghost": tmp_path / "ghost"})
    part = _write_adapter(tmp_path / "part", {"model.layers.0.self_attn.q_proj":
                                              (np.ones((24, 2)), np.ones((2, 16)))}, 2)
    res = deltaspec.zoo({"task0": folders["task0"], "part": part})
    assert res.modules["module"].tolist() == ["model.layers.0.self_attn.q_proj"]
    assert any("3 module(s) present in some updates only" in n for n in res.notes)


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_writes_the_folder_and_refuses_bad_input(tmp_path, planted):
    root, folders, _ = planted
    out = tmp_path / "zoo"
    args = [f"t{j}={folders[f'task{j}']}" for j in range(4)]
    r = _cli("zoo", *args, "--k", "2", "--out", out, "--format", "json", "-q")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["generator"] == "deltaspec zoo"
    files = {p.name for p in out.iterdir()}
    assert {"index.html", "pairs.csv", "matrix.csv", "clusters.csv", "basis.csv", "modules.csv",
            "zoo.json", "heatmap.png", "dendrogram.png", "shared_basis.png"} <= files
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("https://", "")
    pairs = pd.read_csv(out / "pairs.csv")
    assert len(pairs) == 6 * 4 and {"cosine", "subspace_similarity_left", "chance_right"} <= set(pairs)
    assert _cli("zoo", *args[:2], "--out", out, "-q").exit_code == 0  # an earlier zoo is replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    r = _cli("zoo", *args[:2], "--out", foreign)
    assert r.exit_code == 2 and "not empty" in r.output
    nothing = tmp_path / "nothing"
    r = _cli("zoo", args[0], f"x={tmp_path / 'missing'}", "--out", nothing)
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "update 'x'" in r.output
    assert not nothing.exists()
    r = _cli("zoo", args[0], "--out", nothing)
    assert r.exit_code == 2 and "at least two" in r.output


def test_figures_are_returned_not_shown(planted):
    from matplotlib.figure import Figure

    from deltaspec.plots.collection import plot_dendrogram, plot_shared_basis, plot_zoo_heatmap

    _, folders, _ = planted
    res = deltaspec.zoo({lb: p for lb, p in list(folders.items())[:4]}, k=2)
    for fig in (plot_zoo_heatmap(res), plot_zoo_heatmap(res, value="phi_left"),
                plot_dendrogram(res), plot_shared_basis(res)):
        assert isinstance(fig, Figure)
    assert list(res.cosine_matrix().index) == [res.labels[i] for i in res.tree.order]


@pytest.mark.slow
def test_torchrun_equals_one_process(tmp_path, planted):
    """Under torchrun (gloo, 2 ranks on the CPU) modules are shared across ranks; rank 0 writes
    the same tables as one process."""
    from test_distributed import _run

    _, folders, _ = planted
    args = ["zoo", *(f"{lb}={p}" for lb, p in list(folders.items())[:5]), "--k", "2", "-q"]
    for name, nproc in (("one", 1), ("two", 2)):
        res = _run([*args, "--out", str(tmp_path / name)], nproc)
        assert res.returncode == 0, res.stderr[-2000:]
    for table in ("pairs", "matrix", "clusters", "basis", "modules"):
        assert (tmp_path / "one" / f"{table}.csv").read_text() == \
            (tmp_path / "two" / f"{table}.csv").read_text(), table


def test_help_lists_the_shared_options_and_imports_no_torch():
    import subprocess
    import sys

    from test_cli_options import HELP_PROBE, SHARED

    res = _cli("zoo", "--help")
    assert res.exit_code == 0 and "--out DIR" in res.output
    unused = ("--top-k", "--intruders / --no-intruders")  # zoo takes the flags its fields name
    assert all(opt in res.output for opt in SHARED if opt not in unused)
    assert not any(opt in res.output for opt in (*unused, "--merge-dtype", "--alpha"))
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, "zoo", "--help"], capture_output=True,
                          text=True, check=False)
    assert proc.stdout.strip().splitlines()[-1].split()[2:] == [], proc.stdout
