"""The GPU benchmark, in one call on a lent GPU (sized for < 8 minutes on an H200).

    PYTHONPATH=. python3 analyses/benchmarks/run_gpu.py --out $OUT

1. builds a 32-layer (224-module) 7B-shaped full fine-tune and LoRA r=16 adapter, bf16 on disk;
2. per matrix (4096², 11008×4096): deltaspec's values (float64 Gram + eigvalsh) against torch's
   default ``svdvals`` (float32) — median times — each checked against CPU float64 LAPACK; and
   σ + top-8 vectors by the GPU rule (one eigh) against eigvalsh + subspace iteration;
3. end to end: ``compare(base, full)`` over 224 modules (intruders off) and ``analyze`` of the
   224-module adapter, from the files to the DataFrame; intruders' cost on one layer;
4. every CUDA result checked against the CPU in the same run: the per-matrix σ against numpy's
   float64 SVD, and every column of one layer's compare rows and of the adapter's rows against
   ``device="cpu"`` (1e-6 relative).
Prints a markdown table and writes it (and JSON) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import slice7b  # noqa: E402

from deltaspec import analyze, compare, spectrum  # noqa: E402
from deltaspec.engine.spectrum import compute  # noqa: E402


def _timed(fn, reps: int) -> tuple[float, object]:
    """Median wall seconds of ``reps`` calls after one warm-up (CUDA synchronised)."""
    out = fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def per_matrix(root: Path, reps: int) -> list[dict]:
    """Values of one 4096² and one 11008×4096 ΔW: deltaspec vs torch's default, vs CPU float64."""
    from safetensors import safe_open

    rows = []
    shard = root / "full" / "model-00001-of-00032.safetensors"
    base = root / "base" / "model-00001-of-00032.safetensors"
    with safe_open(str(shard), "pt") as ft, safe_open(str(base), "pt") as bs:
        for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
            dw64 = ft.get_tensor(key).double() - bs.get_tensor(key).double()
            t0 = time.perf_counter()
            ref = np.linalg.svd(dw64.numpy(), compute_uv=False)
            cpu_s = time.perf_counter() - t0
            gpu = dw64.float().cuda()
            t_ds, sp = _timed(lambda g=gpu: spectrum(g, device="cuda").values, reps)
            t_tv, tv = _timed(lambda g=gpu: torch.linalg.svdvals(g), max(1, reps // 2))
            t_v1, sv1 = _timed(lambda g=gpu: _top8(g, ""), max(1, reps // 2))
            t_v2, sv2 = _timed(lambda g=gpu: _top8(g, "vectors=evd"), max(1, reps // 2))
            shape = "×".join(map(str, dw64.shape))
            for tool, t, vals in (("deltaspec", t_ds, sp), ("torch.svdvals f32", t_tv, tv),
                                  ("deltaspec σ + top-8 vectors, one eigh (default)", t_v1, sv1),
                                  ("deltaspec σ + top-8, eigvalsh + subspace iteration", t_v2, sv2)):
                v = vals.double().cpu().numpy()
                rows.append({"matrix": shape, "tool": tool, "ms": 1e3 * t,
                             "err": float(np.abs(v - ref).max() / ref[0]), "cpu_f64_s": cpu_s})
    return rows


def _top8(g: torch.Tensor, solver: str) -> torch.Tensor:
    """σ and the top-8 vectors on CUDA with the DELTASPEC_SOLVER ``solver`` ('' = the GPU rule);
    returns σ (the vectors' residuals are checked in tests/test_gpu.py)."""
    before = os.environ.pop("DELTASPEC_SOLVER", None)
    if solver:
        os.environ["DELTASPEC_SOLVER"] = solver
    try:
        return compute(g, vectors_k=8, device="cuda").values  # every σ and the top-8 U, V
    finally:
        os.environ.pop("DELTASPEC_SOLVER", None)
        if before is not None:
            os.environ["DELTASPEC_SOLVER"] = before


def _columns_agree(a, b) -> tuple[bool, float]:
    """All numeric columns equal to 1e-6 (relative, floor 1e-3); integer columns exactly."""
    worst = 0.0
    assert list(a["module"]) == list(b["module"]), "module order differs"
    for col in a.columns:
        x, y = a[col], b[col]
        if str(x.dtype) in ("Int64", "int64"):
            if not x.equals(y):
                return False, float("inf")
        elif x.dtype.kind == "f":
            xa, ya = x.to_numpy(float), y.to_numpy(float)
            ok = ~np.isnan(ya)
            if not np.array_equal(np.isnan(xa), np.isnan(ya)):
                return False, float("inf")
            if ok.any():
                worst = max(worst, float((np.abs(xa[ok] - ya[ok]) / np.maximum(np.abs(ya[ok]), 1e-3)).max()))
    return worst <= 1e-6, worst


def end_to_end(root: Path) -> list[dict]:
    """224-module compare and adapter analysis on CUDA; one layer (and the adapter) on the CPU."""
    rows = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gpu = compare(root / "base", root / "full", device="cuda", intruders=False)
    rows.append({"run": "compare(base, full) 224 modules, intruders off", "s": time.perf_counter() - t0,
                 "modules": len(gpu)})
    t0 = time.perf_counter()
    cpu = compare(root / "base", root / "full", device="cpu", intruders=False, include=r"layers\.0\.")
    cpu_s = time.perf_counter() - t0
    ok, worst = _columns_agree(gpu[gpu["module"].isin(cpu["module"])].reset_index(drop=True), cpu)
    rows.append({"run": "  CPU check: layer 0 (7 modules), every column", "s": cpu_s,
                 "modules": len(cpu), "agree": ok, "worst_rel": worst})
    t0 = time.perf_counter()
    lg = analyze(root / "lora-32", device="cuda")
    rows.append({"run": "analyze(LoRA r=16 adapter) 224 modules", "s": time.perf_counter() - t0,
                 "modules": len(lg)})
    t0 = time.perf_counter()
    lc = analyze(root / "lora-32", device="cpu")
    ok, worst = _columns_agree(lg, lc)
    rows.append({"run": "  CPU check: the adapter, every column", "s": time.perf_counter() - t0,
                 "modules": len(lc), "agree": ok, "worst_rel": worst})
    t0 = time.perf_counter()
    intr = analyze(root / "full", root / "base", device="cuda", include=r"layers\.1\.",
                   intruders=True)
    rows.append({"run": "analyze(full, base) one layer with intruders", "s": time.perf_counter() - t0,
                 "modules": len(intr)})
    return rows


def report(build_s: float, mats: list[dict], e2e: list[dict]) -> str:
    """Markdown tables of the results."""
    dev = torch.cuda.get_device_name(0)
    lines = [f"GPU: {dev}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
             f"build of the 224-module checkpoints: {build_s:.0f} s", "",
             "| matrix | tool | ms (median) | max err σ/σ₁ vs CPU float64 |", "|---|---|---:|---:|"]
    lines += [f"| {r['matrix']} | {r['tool']} | {r['ms']:.1f} | {r['err']:.1e} |" for r in mats]
    lines += ["", "| run | modules | wall s | agrees with CPU (worst rel. diff) |", "|---|---:|---:|---|"]
    for r in e2e:
        agree = f"{r['agree']} ({r['worst_rel']:.1e})" if "agree" in r else ""
        lines.append(f"| {r['run']} | {r['modules']} | {r['s']:.2f} | {agree} |")
    return "\n".join(lines)


def main() -> None:
    """Build, time, check, report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/deltaspec-gpu-bench"))
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="small stand-in shapes (a dry run)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("run_gpu.py needs CUDA")
    if a.tiny:
        slice7b.shrink()
    t0 = time.perf_counter()
    slice7b.build_full(a.root, 32, device="cuda")
    slice7b.build_lora(a.root, 32, device="cuda")
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.0f} s", flush=True)
    mats = per_matrix(a.root, a.reps)
    print(json.dumps(mats), flush=True)
    e2e = end_to_end(a.root)
    text = report(build_s, mats, e2e)
    print(text)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "gpu_results.md").write_text(text + "\n")
    (a.out / "gpu_results.json").write_text(json.dumps({"matrices": mats, "end_to_end": e2e}, indent=1))
    if not all(r.get("agree", True) for r in e2e):
        sys.exit("CUDA results differ from the CPU ones")


if __name__ == "__main__":
    main()
