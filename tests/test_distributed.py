"""Scale-out: every analysing command under ``torchrun`` equals the single-process run.

Real gloo groups of 2 and 3 processes on the CPU (``torchrun --standalone`` as a subprocess);
the fault path: one rank meets a corrupt tensor, every process ends quickly, exit 2, one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import factories as F
import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaspec.engine import distributed as D
from deltaspec.engine.distributed import assign, cost

ROOT = Path(__file__).resolve().parents[1]


def test_assign_is_balanced_and_deterministic():
    costs = [100.0] + [1.0] * 100  # one dense module worth a hundred LoRA modules
    owner = assign(costs, 2)
    assert owner == assign(costs, 2)
    assert owner[0] == 0 and owner.count(0) == 1  # the big one alone on rank 0
    loads = [sum(c for c, r in zip(costs, owner, strict=True) if r == q) for q in range(3)[:2]]
    assert loads == [100.0, 100.0]
    assert sorted(set(assign([1.0] * 7, 3))) == [0, 1, 2]


def test_cost_weighs_dense_over_factored():
    from deltaspec.delta import dense, factored

    z = torch.zeros(1)
    d = dense("m", (11008, 4096), lambda: z, method="full", source="f")
    lora = factored("m", (4096, 4096), lambda: (z, z), method="lora", source="f", rank=16)
    assert cost(d, False, 0) > 1000 * cost(lora, False, 0)


def test_single_process_world():
    w = D.current()
    assert not w.distributed and w.is_writer and w.device("auto") == "auto"


# --- real process groups ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, llama):
    model, base = llama
    root = tmp_path_factory.mktemp("dist")
    ft = F.full_finetune(model, root / "ft", seed=3)
    ft2 = F.full_finetune(model, root / "ft2", seed=4)
    lora, _ = F.lora_adapter(model, root / "lora", r=4, lora_alpha=8,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    return {"base": base, "ft": ft, "ft2": ft2, "lora": lora}


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", DELTASPEC_DIST_TIMEOUT="60")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run(args: list[str], nproc: int = 1, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    if nproc == 1:
        cmd = [sys.executable, "-m", "deltaspec", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "deltaspec", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout,
                          cwd=ROOT)


def _same_output(tmp_path: Path, args: list[str], out_name: str, nproc: int = 2) -> None:
    one, many = tmp_path / "one", tmp_path / "many"
    for folder, n in ((one, 1), (many, nproc)):
        folder.mkdir(parents=True)
        res = _run([*args, "-o" if "." in out_name else "--out", str(folder / out_name)], n)
        assert res.returncode == 0, res.stderr[-2000:]
    a, b = one / out_name, many / out_name
    if a.is_dir():
        for f in sorted(a.rglob("*.csv")) + [a / "summary.json"]:
            rel = f.relative_to(a)
            assert _strip(f) == _strip(b / rel), rel
    else:
        assert _strip(a) == _strip(b)


def _strip(path: Path) -> str:
    """A file's text without what legitimately differs between runs (timestamps, durations)."""
    text = path.read_text()
    if path.suffix != ".json":
        return text
    data = json.loads(text)

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()
                    if k not in {"created", "timestamp", "elapsed_s", "duration_s", "written"}}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), sort_keys=True)


@pytest.mark.slow
def test_analyze_and_compare_equal_single_process(tmp_path, ckpts):
    base, ft, lora = str(ckpts["base"]), str(ckpts["ft"]), str(ckpts["lora"])
    _same_output(tmp_path / "a", ["analyze", ft, "--base", base, "--intruders"], "rows.json", 2)
    _same_output(tmp_path / "c", ["compare", lora, ft, "--base", base], "rows.csv", 3)


@pytest.mark.slow
def test_snapshot_check_report_equal_single_process(tmp_path, ckpts):
    base, ft, ft2, lora = (str(ckpts[k]) for k in ("base", "ft", "ft2", "lora"))
    _same_output(tmp_path / "s", ["snapshot", lora], "baseline.json", 2)
    baseline = tmp_path / "s" / "one" / "baseline.json"
    _same_output(tmp_path / "k", ["check", lora, "--baseline", str(baseline), "--format", "json"],
                 "check.json", 2)
    _same_output(tmp_path / "r", ["report", f"lora={lora}", f"full={ft}", f"full2={ft2}",
                                  "--base", base], "rep", 2)


@pytest.mark.slow
def test_corrupt_tensor_ends_every_rank(tmp_path, ckpts):
    bad = tmp_path / "bad"
    shutil.copytree(ckpts["ft"], bad)
    weights = bad / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if k.endswith("layers.1.mlp.down_proj.weight"))[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "rows.json"
    start = time.monotonic()
    res = _run(["analyze", str(bad), "--base", str(ckpts["base"]), "-o", str(out)], 2, timeout=120)
    assert time.monotonic() - start < 60
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("deltaspec:")]
    assert len(lines) == 1 and "down_proj" in lines[0] and "NaN" in lines[0], res.stderr[-3000:]
    assert "exitcode  : 2" in res.stderr and "exitcode  : 1" not in res.stderr
    assert not out.exists()
