"""compress / extract (deltaspec/act/): genuine PEFT adapters and full fine-tunes in, PEFT LoRA
folders out. Oracles: PEFT's own loading and merge (in float64), float64 numpy SVDs of the
merged updates, PEFT's convert_to_lora ranks, the optht package, the written tensors read back."""

from __future__ import annotations

import copy
import json
import math

import factories as F
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import deltaspec
from deltaspec.act.table import COLUMNS
from deltaspec.cli import main

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def truncated(x: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    """(ΔW_k, energy_kept, rel_error) of a float64 matrix by numpy's SVD."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    e = s**2
    return (u[:, :k] * s[:k]) @ vt[:k], float(e[:k].sum() / e.sum()), \
        math.sqrt(float(e[k:].sum() / e.sum()))


def check_against_reference(df, model, out, want: dict[str, np.ndarray], tol: float = 1e-9) -> None:
    """PEFT loads ``out``; its float64 merge equals the float64 truncation of every ΔW to 1e-6,
    its float32 merge equals W + ΔW_k to 1e-6, and energy_kept/rel_error equal numpy's to
    ``tol`` (1e-9; loaders that fold scales into a float32 factor: 1e-7)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(copy.deepcopy(model), out)
    got = F.expected_deltas64(model, pm)
    merged32 = copy.deepcopy(pm).merge_and_unload().state_dict()
    base = model.state_dict()
    for r in df.itertuples():
        ref, kept, rel = truncated(want[r.module], r.rank)
        assert r.energy_kept == pytest.approx(kept, abs=tol), r.module
        assert r.rel_error == pytest.approx(rel, abs=tol), r.module
        if r.rank == 0:
            assert r.module not in got
            continue
        d = got[r.module].numpy()
        assert np.linalg.norm(d - ref) <= 1e-6 * np.linalg.norm(ref), r.module
        w = base[r.module + ".weight"].double().numpy()
        m32 = merged32[r.module + ".weight"].double().numpy()
        if m32.shape != w.shape:
            continue
        if "c_" in r.module:  # GPT-2 Conv1D stores (in, out)
            ref = ref.T
        assert np.linalg.norm(m32 - (w + ref)) <= 1e-6 * np.linalg.norm(w + ref), r.module


@pytest.fixture(scope="module")
def lora8(tmp_path_factory, llama):
    model, _ = llama
    return F.lora_adapter(model, tmp_path_factory.mktemp("lora8"), r=8, lora_alpha=16,
                          target_modules=ALL)


def test_compress_energy_matches_peft_convert_to_lora_and_merges_exactly(tmp_path, llama, lora8):
    from peft.tuners.lora.conversion import convert_to_lora

    model, _ = llama
    folder, pm = lora8
    df = deltaspec.compress(folder, rank=0.9, out=tmp_path / "c")
    assert list(df.columns) == list(COLUMNS)
    with pytest.warns(UserWarning):
        cfg, _ = convert_to_lora(copy.deepcopy(pm), rank=0.9)
    assert dict(zip(df["module"], df["rank"], strict=True)) == cfg.rank_pattern
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] == cfg.rank_pattern
    check_against_reference(df, model, tmp_path / "c",
                            {k: v.numpy() for k, v in F.expected_deltas64(model, pm).items()})
    assert (df["saved_rel_error"] >= df["rel_error"] - 1e-7).all()
    csv = (tmp_path / "c" / "compression.csv").read_text().splitlines()
    assert csv[0] == ",".join(COLUMNS) and len(csv) == len(df) + 1


def test_compress_multilora_in_bfloat16_reports_the_error_of_what_it_wrote(tmp_path, llama):
    model, _ = llama
    src = F.multilora_adapter(model, tmp_path / "ml", n=3, r=2, lora_alpha=4.0,
                              target_modules=("q_proj", "down_proj"))
    df = deltaspec.compress(src, rank=3, out=tmp_path / "c", dtype="bfloat16", max_rank=2)
    from peft import PeftModel

    PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "c")  # loads unchanged
    assert set(df["rank"]) == {2} and set(df["rank_in"]) == {6}
    raw = load_file(str(src / "multilora_model.safetensors"))
    saved = load_file(str(tmp_path / "c" / "adapter_model.safetensors"))
    want = {}
    for r in df.itertuples():
        a, b, s = (raw[f"{r.module}.lora_{p}"].double() for p in ("A", "B", "scaling"))
        dw = sum(s[i] * b[i] @ a[i] for i in range(3)) * (4.0 / 2)
        want[r.module] = dw.numpy()
        bh = saved[f"base_model.model.{r.module}.lora_B.weight"]
        ah = saved[f"base_model.model.{r.module}.lora_A.weight"]
        assert bh.dtype == ah.dtype == torch.bfloat16
        err = float((dw - bh.double() @ ah.double()).norm() / dw.norm())
        # the MultiLoRA loader folds sᵢ·α/r into B in float32 (≈1e-8): 1e-7 here, 1e-9 for LoRA
        assert r.saved_rel_error == pytest.approx(err, rel=1e-7)
        assert r.saved_rel_error > r.rel_error  # bf16 rounding on top of the truncation
        _, kept, rel = truncated(dw.numpy(), 2)
        assert (r.energy_kept, r.rel_error) == (pytest.approx(kept, abs=1e-7),
                                                pytest.approx(rel, abs=1e-7))


@pytest.fixture(scope="module")
def noisy_ft(tmp_path_factory, llama):
    model, _ = llama
    return F.noisy_finetune(model, tmp_path_factory.mktemp("noisy_ft"), rank=2, noise=2e-3)


def test_extract_gd_ranks_equal_optht_and_the_lora_merges_to_the_truncation(tmp_path, llama,
                                                                              noisy_ft):
    from optht import optht

    model, base = llama
    folder, ft = noisy_ft
    df = deltaspec.extract(folder, base, rank="gd", out=tmp_path / "x")
    sd0, sd1 = model.state_dict(), ft.state_dict()
    want = {}
    for r in df.itertuples():
        x = (sd1[r.module + ".weight"].double() - sd0[r.module + ".weight"].double()).numpy()
        want[r.module] = x
        assert r.rank == optht(x, np.linalg.svd(x, compute_uv=False)), r.module
        assert r.rank_in == min(x.shape) and r.params_in == x.size
    assert (df["rank"] == 2).all()
    assert any("lm_head" in n for n in df.attrs["notes"])
    check_against_reference(df, model, tmp_path / "x", want)
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)


def test_extract_gpt2_conv1d_loads_in_peft(tmp_path, gpt2):
    model, base = gpt2
    folder, ft = F.noisy_finetune(model, tmp_path / "ft", only=".h.")
    df = deltaspec.extract(folder, base, rank=3, out=tmp_path / "x")
    sd0, sd1 = model.state_dict(), ft.state_dict()
    want = {r: (sd1[r + ".weight"].double() - sd0[r + ".weight"].double()).T.numpy()
            for r in df["module"]}  # Conv1D (in, out) → canonical (out, in)
    check_against_reference(df, model, tmp_path / "x", want)


def test_dry_run_and_formats_write_nothing(tmp_path, lora8):
    folder, _ = lora8
    res = cli("compress", folder, "--rank", "energy:0.95", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "total:" in res.output and "energy-weighted rel_error" in res.output
    res = cli("compress", folder, "--rank", "4", "--dry-run", "--format", "json")
    body = json.loads(res.output)
    assert {m["rank"] for m in body["modules"]} == {4}
    assert body["totals"]["params_out"] == sum(m["params_out"] for m in body["modules"])
    res = cli("compress", folder, "--rank", "gd", "--suggest", "--format", "csv")
    assert res.output.splitlines()[0].startswith("module,kind,shape,rank_in,rank,rank_energy90")
    assert list(tmp_path.iterdir()) == []


def test_live_peft_model_and_figure(lora8):
    _, pm = lora8
    df = deltaspec.compress(pm, rank=2)
    assert (df["rank"] == 2).all() and df.attrs["totals"]["params_out"] == df["params_out"].sum()
    from matplotlib.figure import Figure

    from deltaspec.plots import plot_truncation_error

    assert isinstance(plot_truncation_error(df), Figure)


def test_all_zero_adapter_is_a_rank_zero_result(tmp_path, llama):
    model, _ = llama
    folder, _ = F.lora_adapter(model, tmp_path / "zero", r=4, target_modules=["q_proj"],
                               init_lora_weights=True)  # B = 0: never trained
    res = cli("compress", folder, "--rank", "gd", "--out", tmp_path / "c")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["compression.csv"]
    assert "no adapter written" in res.output


def _no_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("args,message", [
    (["--rank", "0"], "positive integer"), (["--rank", "-2"], "positive integer"),
    (["--rank", "1.5"], "(0, 1]"), (["--rank", "energy:0"], "(0, 1]"),
    (["--rank", "svd"], "unknown"), ([], "missing --out"),
])
def test_bad_policies_exit_2(tmp_path, lora8, args, message):
    folder, _ = lora8
    out = [] if message == "missing --out" else ["--out", tmp_path / "c"]
    res = cli("compress", folder, *args, *out)
    assert res.exit_code == 2 and message in res.output and len(res.output.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_out_folder_rules(tmp_path, lora8):
    folder, _ = lora8
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    for extra in ([], ["--overwrite"]):
        res = cli("compress", folder, "--rank", "2", "--out", other, *extra)
        assert res.exit_code == 2 and len(res.output.splitlines()) == 1
    assert [p.name for p in other.iterdir()] == ["keep.txt"]
    assert cli("compress", folder, "--rank", "2", "--out", tmp_path / "c").exit_code == 0
    res = cli("compress", folder, "--rank", "3", "--out", tmp_path / "c")
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert cli("compress", folder, "--rank", "3", "--out", tmp_path / "c", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["r"] == 3
    assert _no_leftovers(tmp_path) == []


def test_nan_factor_mixture_and_shape_mismatch_exit_2(tmp_path, llama, gpt2, noisy_ft):
    from test_loaders_moe import mixlora

    model, _ = llama
    folder, _ = F.lora_adapter(model, tmp_path / "nan", r=2, target_modules=["q_proj"])
    sd = load_file(str(folder / "adapter_model.safetensors"))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(sd, str(folder / "adapter_model.safetensors"))
    moe, _, _ = mixlora(tmp_path / "moe")
    cases = [(["compress", folder, "--rank", "2"], "NaN"),
             (["compress", moe, "--rank", "2"], "routed mixture"),
             (["extract", noisy_ft[0], "--base", gpt2[1], "--rank", "2"], "")]
    for args, message in cases:
        res = cli(*args, "--out", tmp_path / "out")
        assert res.exit_code == 2 and message in res.output, res.output
        assert [ln for ln in res.output.splitlines() if "error" in ln] == res.output.splitlines()[-1:]
        assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path) == []


@pytest.mark.slow
def test_extract_under_torchrun_equals_one_process(tmp_path, llama, noisy_ft):
    from test_distributed import _run

    _, base = llama
    outs = []
    for nproc in (1, 2):
        out = tmp_path / f"x{nproc}"
        res = _run([str(x) for x in ("extract", noisy_ft[0], "--base", base, "--rank", "gd",
                                     "--out", out, "-q")],
                   nproc)
        assert res.returncode == 0, res.stderr[-2000:]
        outs.append(out)
    one, two = outs
    assert (one / "compression.csv").read_text() == (two / "compression.csv").read_text()
    a, b = (load_file(str(o / "adapter_model.safetensors")) for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x1", "x2"]


@pytest.mark.parametrize("case", ["adalora", "vera", "loha", "lokr", "ia3", "oft"])
def test_compress_other_peft_types_to_a_lora(tmp_path, llama, case):
    import peft

    model, base = llama
    make = {
        "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                              target_modules=["q_proj", "down_proj"]),
        "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "up_proj"]),
        "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]),
        "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]),
        "ia3": lambda: peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                      feedforward_modules=["down_proj"]),
        "oft": lambda: peft.OFTConfig(r=4, oft_block_size=0, target_modules=["q_proj"]),
    }[case]
    folder, pm = F.peft_typed_adapter(model, tmp_path / case, make())
    df = deltaspec.compress(folder, rank=3, out=tmp_path / "c", base=base)
    assert (df["rank"] == 3).all()
    check_against_reference(df, model, tmp_path / "c",
                            {k: v.numpy() for k, v in F.expected_deltas64(model, pm).items()},
                            tol=1e-7)
