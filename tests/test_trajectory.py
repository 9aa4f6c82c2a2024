"""Trajectories over training: a genuine Trainer + PEFT LoRA run, its checkpoints analysed step by
step (against deltaspec.analyze of each, and float64 numpy for the drift), the live callback's
logged values against the same numbers, the page, and bad input."""

from __future__ import annotations

import io
import json
import math
import shutil

import factories as F
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

import deltaspec
from deltaspec.callbacks import SpectralCallback
from deltaspec.cli import main
from deltaspec.columns import analyze_columns
from deltaspec.errors import CheckpointError, UsageError
from deltaspec.trajectory import DRIFT, MismatchError, points, trajectory

STEPS = (8, 16, 24)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """(run folder, the callback that watched it): 24 steps, a checkpoint and a log point every 8."""
    folder = tmp_path_factory.mktemp("trainer_run")
    cb = SpectralCallback(every=8, k=4)
    trainer = F.trainer_lora_run(folder, callbacks=[cb])
    return folder, cb, trainer


@pytest.fixture(scope="module")
def traj(run_dir):
    return trajectory(run_dir[0], k=4)


def _dense(ckpt) -> dict[str, np.ndarray]:
    """ΔW = (α/r)·B·A per module from the saved tensors, float64 (the oracle)."""
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    t = load_file(str(ckpt / "adapter_model.safetensors"))
    s = cfg["lora_alpha"] / cfg["r"]
    out = {}
    for key, a in t.items():
        if ".lora_A." in key:
            b = t[key.replace("lora_A", "lora_B")]
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            out[name] = s * b.astype(np.float64) @ a.astype(np.float64)
    return out


def _phi(x: np.ndarray, y: np.ndarray, k: int) -> float:
    return float(np.sum((x[:, :k].T @ y[:, :k]) ** 2) / k)


def test_one_row_per_step_and_module_equal_to_analyze(run_dir, traj):
    folder, _, _ = run_dir
    assert list(traj.columns) == ["step", "checkpoint", *analyze_columns(False), *DRIFT]
    assert sorted(set(traj["step"])) == list(STEPS)
    for step in STEPS:
        rows = traj[traj["step"] == step].reset_index(drop=True)
        ref = deltaspec.analyze(folder / f"checkpoint-{step}", k=4)
        assert list(rows["module"]) == list(ref["module"])
        for col in analyze_columns(False):
            if pd.api.types.is_numeric_dtype(ref[col]):
                np.testing.assert_allclose(rows[col].astype(float), ref[col].astype(float),
                                           rtol=1e-9, atol=1e-12, err_msg=col)
            else:
                assert list(rows[col].astype(str)) == list(ref[col].astype(str)), col


def test_drift_against_numpy(run_dir, traj):
    folder, _, _ = run_dir
    w = {s: _dense(folder / f"checkpoint-{s}") for s in STEPS}
    for i, step in enumerate(STEPS):
        for name, d in w[step].items():
            row = traj[(traj["step"] == step) & (traj["module"] == name)].iloc[0]
            fin = w[STEPS[-1]][name]
            cos = float(np.sum(d * fin) / (np.linalg.norm(d) * np.linalg.norm(fin)))
            assert row["cosine_final"] == pytest.approx(cos, abs=1e-6)
            u, _, vt = np.linalg.svd(d)
            uf, _, vtf = np.linalg.svd(fin)
            assert row["phi_final_left"] == pytest.approx(_phi(u, uf, 4), abs=1e-5)
            assert row["phi_final_right"] == pytest.approx(_phi(vt.T, vtf.T, 4), abs=1e-5)
            if i == 0:
                assert math.isnan(row["phi_prev_left"]) and math.isnan(row["norm_change"])
                continue
            prev = w[STEPS[i - 1]][name]
            up, _, vtp = np.linalg.svd(prev)
            assert row["phi_prev_left"] == pytest.approx(_phi(u, up, 4), abs=1e-5)
            assert row["phi_prev_right"] == pytest.approx(_phi(vt.T, vtp.T, 4), abs=1e-5)
            change = np.linalg.norm(d) / np.linalg.norm(prev) - 1
            assert row["norm_change"] == pytest.approx(change, abs=1e-6)


def test_callback_logs_equal_the_checkpoints(run_dir, traj):
    """At each save step the logged per-kind means equal the analysis of the saved checkpoint."""
    _, cb, trainer = run_dir
    logged = {h["step"]: h for h in trainer.state.log_history
              if any(k.startswith("deltaspec/") for k in h)}
    assert sorted(logged) == list(STEPS)
    for step in STEPS:
        rows = traj[traj["step"] == step]
        for kind, g in rows.groupby(rows["kind"].astype(str)):
            for metric in ("normalized_entropy", "effective_rank", "top1_share"):
                assert logged[step][f"deltaspec/{kind}/{metric}"] == pytest.approx(
                    float(g[metric].mean()), abs=1e-6)
            for side in ("left", "right"):
                key = f"deltaspec/{kind}/phi_prev_{side}"
                if step == STEPS[0]:
                    assert key not in logged[step]
                else:
                    assert logged[step][key] == pytest.approx(
                        float(g[f"phi_prev_{side}"].mean()), abs=1e-6)
    assert cb.monitor.enabled and cb.stop_reason is None


@pytest.mark.slow
def test_explicit_steps_and_page(run_dir, traj, tmp_path):
    folder, _, _ = run_dir
    items = [f"{s}={folder / f'checkpoint-{s}'}" for s in STEPS[::-1]]  # any order: by step
    out = tmp_path / "page"
    res = CliRunner().invoke(main, ["trajectory", *items, "--k", "4", "--out", str(out),
                                    "--format", "csv", "-q", "--include", "q_proj"])
    assert res.exit_code == 0, res.output
    got = pd.read_csv(out / "trajectory.csv")
    want = traj[traj["kind"] == "q_proj"]
    assert len(got) == len(want) and list(got["step"]) == list(want["step"])
    np.testing.assert_allclose(got["phi_final_left"], want["phi_final_left"], rtol=1e-9)
    assert pd.read_csv(io.StringIO(res.output))["module"].tolist() == got["module"].tolist()
    assert {"index.html", "metric_vs_step.png", "drift.png", "heatmap.png", "means.csv",
            "summary.json"} <= {p.name for p in out.iterdir()}
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "Means per step" in page
    table = CliRunner().invoke(main, ["trajectory", str(folder), "--k", "4", "-q"])
    assert table.exit_code == 0 and "q_proj" in table.output and "phi_final_left" in table.output


def test_mapping_api_and_step_parsing(run_dir):
    folder, _, _ = run_dir
    got = points({16: folder / "checkpoint-16", 8: folder / "checkpoint-8"})
    assert [p.step for p in got] == [8, 16]
    assert [p.step for p in points(folder)] == list(STEPS)
    with pytest.raises(UsageError, match="cannot read a step"):
        points([str(folder)])
    with pytest.raises(UsageError, match="given twice"):
        points([f"8={folder / 'checkpoint-8'}", str(folder / "checkpoint-8")])


def _cli(*args):
    return CliRunner().invoke(main, ["trajectory", *map(str, args)])


def test_bad_runs_one_line_exit_2_nothing_written(run_dir, tmp_path, llama_lora):
    folder, _, _ = run_dir
    empty = tmp_path / "empty"
    empty.mkdir()
    out, page = tmp_path / "t.csv", tmp_path / "page"
    res = _cli(empty, "-o", out, "--out", page)
    assert res.exit_code == 2 and "no checkpoint folders" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # a checkpoint of another model (other modules, shapes) in the run
    mixed = tmp_path / "mixed"
    shutil.copytree(folder / "checkpoint-8", mixed / "checkpoint-8")
    shutil.copytree(llama_lora[0], mixed / "checkpoint-99")
    res = _cli(mixed, "-o", out, "--out", page, "--skip-bad")
    assert res.exit_code == 2 and "checkpoint-8" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not page.exists()


def test_checkpoints_of_another_base_are_refused(run_dir, tmp_path):
    folder, _, _ = run_dir
    run = tmp_path / "run"
    for step in (8, 24):
        shutil.copytree(folder / f"checkpoint-{step}", run / f"checkpoint-{step}",
                        ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth"))
    cfg_path = run / "checkpoint-8" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other-base"}))
    (run / "checkpoint-24" / "adapter_config.json").write_text(
        json.dumps({**cfg, "base_model_name_or_path": "org/base"}))
    with pytest.raises(MismatchError, match="checkpoint-8: base org/other-base but org/base"):
        trajectory(run, skip_bad=True, discover_base=False)


def test_unreadable_checkpoint_named_or_skipped(run_dir, tmp_path):
    folder, _, _ = run_dir
    run = tmp_path / "run"
    shutil.copytree(folder, run, ignore=shutil.ignore_patterns("*.bin", "*.pt", "*.pth"))
    weights = run / "checkpoint-16" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    res = _cli(run, "--k", "4", "-o", tmp_path / "t.csv", "--include", "v_proj")
    assert res.exit_code == 2 and "checkpoint-16" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "t.csv").exists()
    with pytest.raises(CheckpointError, match="checkpoint-16"):
        trajectory(run, k=4, include="v_proj")
    df = trajectory(run, k=4, skip_bad=True, include="v_proj")
    assert sorted(set(df["step"])) == [8, 24]
    assert [n for n, _ in df.attrs["skipped_checkpoints"]] == [str(run / "checkpoint-16")]
    res = _cli(run, "--k", "4", "--skip-bad", "-o", tmp_path / "t.csv", "--include", "v_proj")
    assert res.exit_code == 0 and "left out (--skip-bad)" in res.output
    assert "checkpoint-16" in res.output


def test_full_finetune_trajectory_dense(llama, tmp_path):
    """Full checkpoints with a base: the dense route, cosine against float64 numpy."""
    model, base = llama
    run = tmp_path / "full"
    for step, seed in ((1, 5), (2, 6)):
        F.full_finetune(model, run / f"checkpoint-{step}", seed=seed, rank=3)
    df = trajectory(run, base=base, include="layers.0.self_attn", k=2)
    assert sorted(set(df["step"])) == [1, 2] and "relative_norm" in df.columns
    w0 = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    t = {s: load_file(str(run / f"checkpoint-{s}" / "model.safetensors")) for s in (1, 2)}
    for _, row in df[df["step"] == 1].iterrows():
        key = row["module"] + ".weight"
        a, b = (t[s][key].astype(np.float64) - w0[key] for s in (1, 2))
        cos = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert row["cosine_final"] == pytest.approx(cos, abs=1e-6)
        ref = deltaspec.analyze(run / "checkpoint-1", base=base, include="layers.0.self_attn", k=2)
        assert row["normalized_entropy"] == pytest.approx(
            float(ref.set_index("module").loc[row["module"], "normalized_entropy"]), rel=1e-9)
