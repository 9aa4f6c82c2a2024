"""deltaspec against its peers (modeldelta, torch's float32 svdvals, numpy, WeightWatcher) on a
7B-shaped slice, every tool in the same run on the same files: one command, two tables (the runs,
and deltaspec/peer ratios per workload with the issue's targets), also written to a file.

    python analyses/benchmarks/bench.py                       # CPU: 1 layer + the 224-module LoRA
    python analyses/benchmarks/bench.py --quick               # sanity run: ¼-scale shapes, ~minutes
    python analyses/benchmarks/bench.py --preset speedbar     # every target and peer, one run
    python analyses/benchmarks/bench.py --layers 2 --tools deltaspec,numpy --device cuda

Checkpoints (built once under --root by slice7b.py, bf16 on disk, Llama-7B shapes):
  matrix    one dense 4096² ΔW (layer 0's q_proj, float32): only the solver call is timed
  lora      the first --layers layers of a PEFT LoRA r=16 adapter (7 modules per layer)
  full      a --layers full fine-tune against its base (sharded safetensors)
  lora224   the whole 224-module adapter (deltaspec analyze end to end, and WeightWatcher)
  rss       deltaspec analyze --intruders of a --rss-layers full fine-tune with its base: peak RSS
            against 1 GiB + 3 of its largest matrices
Tools: deltaspec (values: spectra()/spectrum()), deltaspec-analyze (every default column),
deltaspec-cli (the CLI end to end, process start included), modeldelta (pip install modeldelta:
its compare_models() on base and fine-tune, torch float32 svdvals per module), numpy's
svd(compute_uv=False) in float64 and float32, torch's default svdvals (float32), WeightWatcher.
Tools run one per process (``OMP_WAIT_POLICY=PASSIVE`` for all, so torch's OpenMP threads do not
spin against BLAS threads on a shared CPU). Wall time: from opening the files to the last σ
(imports excluded); RSS: that process's peak. Errors against a float64 LAPACK reference (scipy
gesvd of ΔW = f64(tuned) − f64(base); for LoRA the exact R_B·R_Aᵀ core with numpy QR): the
largest |σᵢ − σᵢ,ref| / σ₁,ref over modules, and the largest |H − H_ref| of the σ-entropy.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import slice7b  # noqa: E402

TOOLS = ("deltaspec", "deltaspec-analyze", "deltaspec-cli", "modeldelta", "numpy", "numpy-f32",
         "torch", "weightwatcher")
SLICE_TOOLS = ("deltaspec", "deltaspec-analyze", "numpy", "torch", "weightwatcher")
WORKLOADS = {"matrix": ("deltaspec", "numpy", "numpy-f32", "torch"), "lora": SLICE_TOOLS,
             "full": (*SLICE_TOOLS, "modeldelta"),
             "lora224": ("deltaspec-analyze", "deltaspec-cli", "weightwatcher"),
             "rss": ("deltaspec-analyze",)}
OPTIONAL = {"weightwatcher": "weightwatcher", "modeldelta": "modeldelta"}  # tool → module
# (workload, deltaspec's tool, peer, target on deltaspec/peer wall time or None)
RATIOS = [("matrix", "deltaspec", "torch", 1.2), ("matrix", "deltaspec", "numpy", None),
          ("lora", "deltaspec-analyze", "weightwatcher", None),
          ("lora", "deltaspec-analyze", "torch", None),
          ("full", "deltaspec-analyze", "modeldelta", 0.8),
          ("full", "deltaspec-analyze", "torch", None),
          ("full", "deltaspec-analyze", "numpy", None),
          ("full", "deltaspec-analyze", "weightwatcher", None),
          ("lora224", "deltaspec-analyze", "weightwatcher", 0.01),
          ("lora224", "deltaspec-cli", "weightwatcher", None)]
# --preset speedbar: the targets (full FT ≤ 0.8× modeldelta, dense 4096² ≤ 1.2× torch,
# intruders' peak RSS, 224-module LoRA vs WeightWatcher and the CLI) with every peer, one run
PRESETS = {"speedbar": {"workloads": "matrix,full,lora224,rss", "layers": 2, "rss_layers": 1,
                        "tools": "deltaspec,deltaspec-analyze,deltaspec-cli,torch,modeldelta,"
                                 "weightwatcher"}}
MATRIX = "model.layers.0.self_attn.q_proj"  # the 'matrix' workload: one dense 4096² ΔW


# ---------------------------------------------------------------- reading ΔW outside deltaspec
def _lora_items(folder: Path, layers: int):
    """(module name, B, A, scale) of the first ``layers`` layers, read with safetensors."""
    from safetensors import safe_open

    cfg = json.loads((folder / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
        for i in range(layers):
            for mod in slice7b.MODULES:
                prefix = f"base_model.model.model.layers.{i}.{mod}"
                yield (f"model.layers.{i}.{mod}", fh.get_tensor(f"{prefix}.lora_B.weight"),
                       fh.get_tensor(f"{prefix}.lora_A.weight"), scale)


def _full_items(root: Path, layers: int):
    """(module name, tuned, base) as stored (bf16), one layer's shard at a time."""
    from safetensors import safe_open

    for i in range(layers):
        shard = f"model-{i + 1:05d}-of-{layers:05d}.safetensors"
        with safe_open(str(root / "full" / shard), framework="pt") as ft, \
                safe_open(str(root / "base" / shard), framework="pt") as bs:
            for mod in slice7b.MODULES:
                key = f"model.layers.{i}.{mod}.weight"
                yield key.removesuffix(".weight"), ft.get_tensor(key), bs.get_tensor(key)


def _dense(workload: str, a: argparse.Namespace, dtype):
    """(name, dense ΔW as a torch tensor of ``dtype``) the way a user would form it."""
    if workload == "matrix":
        for name, t, b in _full_items(a.root, a.layers):
            if name == MATRIX:
                yield name, t.to(dtype) - b.to(dtype)
                return
    elif workload == "lora":
        for name, b, aa, s in _lora_items(a.root / f"lora-{a.layers}", a.layers):
            yield name, (b.to(dtype) @ aa.to(dtype)) * s
    else:
        for name, t, b in _full_items(a.root, a.layers):
            yield name, t.to(dtype) - b.to(dtype)


# ---------------------------------------------------------------- tools (each in its own process)
def tool_reference(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    import scipy.linalg
    import torch

    out = {}
    if workload == "lora":
        for name, b, aa, s in _lora_items(a.root / f"lora-{a.layers}", a.layers):
            rb = np.linalg.qr(b.to(torch.float64).numpy(), mode="r")
            ra = np.linalg.qr(aa.to(torch.float64).numpy().T, mode="r")
            sv = np.linalg.svd(rb @ ra.T, compute_uv=False) * s
            out[name] = np.concatenate([sv, np.zeros(min(b.shape[0], aa.shape[1]) - sv.size)])
        return out
    for name, dw in _dense(workload, a, torch.float64):
        out[name] = scipy.linalg.svd(dw.numpy(), compute_uv=False, lapack_driver="gesvd")
    return out


def _solve_each(workload: str, a: argparse.Namespace, dtype, solve) -> dict[str, np.ndarray]:
    """``solve`` on each dense ΔW; for the 'matrix' workload only the solve itself is timed."""
    if workload != "matrix":
        return {name: solve(dw) for name, dw in _dense(workload, a, dtype)}
    items, a.walls = list(_dense(workload, a, dtype)), []
    for _ in range(a.repeat):  # one matrix: the median of a few solves (a shared CPU is noisy)
        t0 = time.perf_counter()
        out = {name: solve(dw) for name, dw in items}
        a.walls.append(time.perf_counter() - t0)
    return out


def tool_numpy(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    import torch

    return _solve_each(workload, a, torch.float64, lambda dw: np.linalg.svd(dw.numpy(), compute_uv=False))


def tool_numpy_f32(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    import torch

    return _solve_each(workload, a, torch.float32,
                       lambda dw: np.linalg.svd(dw.numpy(), compute_uv=False).astype(np.float64))


def tool_torch(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    import torch

    return _solve_each(workload, a, torch.float32,  # torch's default dtype and driver
                       lambda dw: torch.linalg.svdvals(dw.to(a.device)).double().cpu().numpy())


def _paths(workload: str, a: argparse.Namespace) -> tuple[Path, Path | None]:
    """(update, base) folders of a workload."""
    if workload in ("lora", "lora224"):
        return a.root / f"lora-{32 if workload == 'lora224' else a.layers}", None
    root = a.root / f"rss-{a.rss_layers}" if workload == "rss" and a.rss_layers != a.layers \
        else a.root
    return root / "full", root / "base"


def tool_deltaspec(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    import deltaspec

    if workload == "matrix":  # the public spectrum() on one float32 ΔW (Gram + eigvalsh, float64)
        import torch

        return _solve_each(workload, a, torch.float32,
                           lambda dw: deltaspec.spectrum(dw, device=a.device).values.numpy())
    path, base = _paths(workload, a)
    sp = deltaspec.spectra(path, base, device=a.device)
    return {n: s.values.numpy() for n, s in sp.items()}


def tool_deltaspec_analyze(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    """Every default column (with a base: relative_norm and amplification; intruders only with
    --intruders, and always for the rss workload)."""
    import deltaspec

    path, base = _paths(workload, a)
    from deltaspec.analyze import run_paths

    intruders = a.intruders or workload == "rss"  # rss: the memory bound with --intruders
    opts = deltaspec.Options(device=a.device, keep_spectra=True, intruders=intruders)
    return {n: s.values.numpy() for n, s in run_paths(path, None, base, opts).spectra.items()}


# `deltaspec …` as its console script runs it, then its own peak RSS (VmHWM) on stderr
_CLI_HWM = ("import sys\nfrom deltaspec.cli import main\n"
            "try:\n    main(sys.argv[1:], prog_name='deltaspec')\n"
            "finally:\n    print(next((ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')),"
            " ''), file=sys.stderr)")


def tool_deltaspec_cli(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    """``deltaspec analyze PATH [--base B] --format csv`` as a user runs it: the wall time of the
    whole process (interpreter start and imports included)."""
    import csv
    import io

    path, base = _paths(workload, a)
    cmd = [sys.executable, "-c", _CLI_HWM, "analyze", str(path), "--format", "csv",
           "--device", a.device] + (["--base", str(base)] if base else [])
    a.t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    a.walls = [time.perf_counter() - a.t0]
    hwm = [ln.split()[1] for ln in proc.stderr.splitlines() if ln.startswith("VmHWM:")]
    a.rss_mb = int(hwm[-1]) / 1024 if hwm else None  # the command's own peak, not this worker's
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    return {r["module"]: np.array([float(r.get("fro_norm") or "nan")]) for r in rows}


def tool_modeldelta(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    """modeldelta's compare_models() (pip install modeldelta) on the base and the fine-tune: per
    module a float32 ``torch.linalg.svdvals`` of ΔW (and norms, cosine, sparsity); it keeps the
    top-20 σ, which are compared."""
    from modeldelta.core.weight_diff import compare_models
    from modeldelta.utils.model_loader import get_tensor_map

    path, base = _paths(workload, a)
    results, _ = compare_models(get_tensor_map(str(base)), get_tensor_map(str(path)))
    return {r["name"].removesuffix(".weight"): np.array(r["top_singular_values"])
            for r in results if r.get("has_svd")}


def tool_weightwatcher(workload: str, a: argparse.Namespace) -> dict[str, np.ndarray]:
    """WeightWatcher's analyze(): peft=True on the adapter, base_model= for the fine-tune. It
    reports σ_max per layer (compared with σ₁; it gives no full spectrum)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import weightwatcher as ww

    path, base = _paths(workload, a)
    scale = 1.0
    if base is None:
        df = ww.WeightWatcher(model=str(path)).analyze(peft=True)
        cfg = json.loads((path / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]  # WeightWatcher leaves α/r out; put back for the error
    else:
        df = ww.WeightWatcher(model=str(path), base_model=str(base)).analyze()
    out = {}
    for _, row in df.iterrows():
        name = str(row["longname"]).removeprefix("base_model.model.").removesuffix(".lora_BA")
        out[name.removesuffix(".weight")] = np.array([float(row["sv_max"]) * scale])
    return out


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ru_maxrss keeps the high-water mark of the process that
    spawned it across exec (a worker started by a 2 GB parent reads ≥ 2 GB), so VmHWM of this
    process's own memory map is read where /proc has it."""
    import resource

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(tool: str, workload: str, a: argparse.Namespace, out: Path) -> None:
    fn = globals()["tool_" + tool.replace("-", "_")]
    a.t0 = time.perf_counter()
    values = fn(workload, a)
    wall = time.perf_counter() - a.t0
    walls = getattr(a, "walls", [wall])
    rss = getattr(a, "rss_mb", None) or peak_rss_mb()  # a tool run as a child reports its own
    np.savez(out, **{k.replace(".", "|"): v for k, v in values.items()})
    print(json.dumps({"wall": float(np.median(walls)), "walls": walls, "rss_mb": rss,
                      "modules": len(values)}))


# ---------------------------------------------------------------- driver
def run(tool: str, workload: str, a: argparse.Namespace, cache: Path) -> dict:
    """Run one tool on one workload in a fresh process; returns its timing and values."""
    module = OPTIONAL.get(tool)
    if module and importlib.util.find_spec(module) is None:
        return {"tool": tool, "workload": workload, "error": f"not installed (pip install {module})"}
    npz = cache / f"{tool}-{workload}-{a.layers}-{a.device.replace(':', '')}.npz"
    done = npz.with_suffix(".json")
    if npz.is_file() and (tool == "reference" or (a.resume and done.is_file())):
        info = json.loads(done.read_text()) if done.is_file() else {}
        with np.load(npz) as z:  # the reference (float64 LAPACK on the same files) runs once
            return info | {"values": {k.replace("|", "."): z[k] for k in z.files}}
    cmd = [sys.executable, __file__, "--worker", tool, workload, "--out", str(npz),
           *a.passthrough]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=None if tool.startswith(("deltaspec", "reference"))
                              else a.timeout)
    except subprocess.TimeoutExpired:  # a lower bound on its time: the ratio is an upper bound
        return {"tool": tool, "workload": workload, "error": f"stopped after {a.timeout:.0f} s",
                "wall_min": a.timeout}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"tool": tool, "workload": workload, "error": " | ".join(tail)[:300]}
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps(info | {"tool": tool, "workload": workload}))
    with np.load(npz) as z:
        info["values"] = {k.replace("|", "."): z[k] for k in z.files}
    return info | {"tool": tool, "workload": workload}


def _entropy(s: np.ndarray) -> float:
    p = np.clip(s, 0, None)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def errors(values: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> tuple[float, float]:
    """(max |Δσ|/σ₁, max |ΔH|) over the modules both have (σ₁ only when a tool gives only σ₁)."""
    err, dh = 0.0, 0.0
    for name, r in ref.items():
        if name not in values:
            continue
        v = np.sort(values[name])[::-1]
        k = min(v.size, r.size)
        err = max(err, float(np.abs(v[:k] - r[:k]).max() / r[0]))
        if v.size == r.size:
            dh = max(dh, abs(_entropy(v) - _entropy(r)))
    return err, (dh if any(values[n].size > 1 for n in values) else float("nan"))


def machine() -> str:
    """CPU model, its vector flags, cores and load, and the solver routes deltaspec chose."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    text = (f"{model} ({' '.join(wanted) or 'no AVX flags read'}), {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}")
    try:  # which BLAS/LAPACK each library computes with (threadpoolctl; torch's build)
        from deltaspec.machine import blas_libraries

        text += "; BLAS: " + ", ".join(f"{k} {v}" for k, v in blas_libraries().items())
    except ImportError:
        pass
    if os.environ.get("OPENBLAS_CORETYPE"):
        text += f", OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"
    return text


def solver_policy() -> str:
    """The CPU routes deltaspec uses here (measured once per machine, see engine/solvers.py)."""
    from deltaspec.engine import solvers

    pol = solvers.policy(4096)
    return f"values={pol.values}, vectors={pol.vectors}, fallback={pol.fallback} ({pol.source})"


def _policy_in_worker() -> str:
    """:func:`solver_policy` in a process like the tools' (OMP_WAIT_POLICY=PASSIVE: spinning
    OpenMP threads make LAPACK on a shared CPU many times slower)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    code = "import bench; print(bench.solver_policy())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=HERE)
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else "unknown"


def _row_errors(r: dict, refs: dict[str, dict]) -> tuple[float, float]:
    ref = refs.get(r["workload"])
    return errors(r["values"], ref) if ref and r.get("values") else (float("nan"), float("nan"))


def table(rows: list[dict], refs: dict[str, dict], a: argparse.Namespace) -> str:
    """The results as markdown: every run, then deltaspec/peer ratios against the targets."""
    largest = max(m * n for m, n in slice7b.MODULES.values())
    lines = ["| workload | tool | modules | wall s | s/module | peak RSS MB | max err σ/σ₁ | max ΔH |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['tool']} | – | failed: {r['error']} | | | | |")
            continue
        err, dh = _row_errors(r, refs)
        n = r["modules"]
        lines.append(f"| {r['workload']} | {r['tool']} | {n} | {r['wall']:.2f} | {r['wall'] / n:.3f} "
                     f"| {r['rss_mb']:.0f} | {err:.1e} | {dh:.1e} |")
    spread = [f"{r['tool']} {min(r['walls']):.2f}–{max(r['walls']):.2f}" for r in rows
              if r.get("workload") == "matrix" and len(r.get("walls", [])) > 1]
    if spread:
        lines.append(f"\nmatrix: median of {a.repeat} solves; range (s): " + ", ".join(spread))
    lines += ["", ratio_table(rows, refs, largest)]
    lines.append(f"\nMachine: {machine()}; device: {a.device}; deltaspec's CPU routes: "
                 f"{a.policy}; shapes: {_scale(a)}")
    return "\n".join(lines)


def _scale(a: argparse.Namespace) -> str:
    return "64/96 (--tiny)" if a.tiny else "quarter scale (--quick)" if a.quick else "Llama-7B"


def ratio_table(rows: list[dict], refs: dict[str, dict], largest: int) -> str:
    """deltaspec/peer wall-time ratios of the same run (and accuracy: peer error / deltaspec's)."""
    by = {(r["workload"], r["tool"]): r for r in rows if "error" not in r or "wall_min" in r}
    out = ["| workload | deltaspec tool | peer | deltaspec s | peer s | deltaspec/peer | "
           "error peer/deltaspec | target | met |", "|---|---|---|---:|---:|---:|---:|---|---|"]
    for workload, ours, peer, target in RATIOS:
        mine, theirs = by.get((workload, ours)), by.get((workload, peer))
        if mine is None or theirs is None:
            continue
        if "wall" not in mine:
            continue
        bound = "wall" not in theirs  # the peer was stopped: its time is a lower bound
        peer_s = theirs["wall_min"] if bound else theirs["wall"]
        ratio = mine["wall"] / peer_s
        e_mine, e_theirs = _row_errors(mine, refs)[0], _row_errors(theirs, refs)[0]
        acc = e_theirs / e_mine if e_mine > 0 else float("inf") if e_theirs > 0 else float("nan")
        met = "" if target is None else ("yes" if ratio <= target else
                                         "not shown (peer stopped)" if bound else "no")
        goal = "" if target is None else f"≤ {target:g}"
        out.append(f"| {workload} | {ours} | {peer} | {mine['wall']:.2f} | "
                   f"{'> ' if bound else ''}{peer_s:.2f} | {'< ' if bound else ''}{ratio:.3f} | "
                   f"{acc:.1e} | {goal} | {met} |")
    cli = by.get(("lora224", "deltaspec-cli"))
    if cli is not None:
        out.append(f"| lora224 | deltaspec-cli | (absolute) | {cli['wall']:.2f} | | | | ≤ 2 s | "
                   f"{'yes' if cli['wall'] <= 2 else 'no'} |")
    rss = by.get(("rss", "deltaspec-analyze"))
    if rss is not None:
        for label, nbytes in (("bf16", 2), ("float32", 4)):
            bound = 1024 + 3 * largest * nbytes / 2**20
            out.append(f"| rss (--intruders, {rss['modules']} modules) | deltaspec-analyze | "
                       f"(peak RSS MB) | {rss['rss_mb']:.0f} | | | | ≤ {bound:.0f} (1 GiB + 3 "
                       f"largest in {label}) | {'yes' if rss['rss_mb'] <= bound else 'no'} |")
    return "\n".join(out)


def parse(argv: list[str]) -> argparse.Namespace:
    """Command-line options (also handed on to the worker processes)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "deltaspec-bench")
    ap.add_argument("--layers", type=int, default=1, help="layers in the slice (7 modules each)")
    ap.add_argument("--rss-layers", type=int, default=4, help="layers of the RSS checkpoint")
    ap.add_argument("--device", default="cpu", help="device of deltaspec and torch")
    ap.add_argument("--intruders", action="store_true", help="include intruders in analyze()")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--workloads", default="matrix,lora,full,lora224,rss")
    ap.add_argument("--repeat", type=int, default=3, help="solves of the 'matrix' workload (median)")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already made under --root")
    ap.add_argument("--tiny", action="store_true", help="64/96-wide stand-in shapes (a dry run)")
    ap.add_argument("--quick", action="store_true",
                    help="sanity run: quarter-scale shapes (1024/2752), one solve, 1-layer rss")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="seconds a peer may run on one workload; a slower one is stopped and "
                         "its time reported as a lower bound [default: 900]")
    ap.add_argument("--report", type=Path, help="also write the tables here (default: under --root)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="the speed bar's runs: every "
                    "workload with a target, every peer, in one run (explicit options override)")
    ap.add_argument("--worker", nargs=2, metavar=("TOOL", "WORKLOAD"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    preset = ap.parse_known_args(argv)[0].preset
    if preset:
        ap.set_defaults(**PRESETS[preset])
    a = ap.parse_args(argv)
    a.passthrough = ["--root", str(a.root), "--layers", str(a.layers), "--rss-layers",
                     str(a.rss_layers), "--device", a.device, "--repeat", str(a.repeat)]
    a.passthrough += ["--intruders"] if a.intruders else []
    if a.quick and not a.worker:
        a.repeat, a.rss_layers = 1, 1
        a.root = a.root.with_name(a.root.name + "-quick")
        a.passthrough = ["--root", str(a.root), "--layers", str(a.layers), "--rss-layers", "1",
                         "--device", a.device, "--repeat", "1"] + a.passthrough[10:]
    if a.quick:
        slice7b.shrink(1024, 2752)
        a.passthrough.append("--quick")
    if a.tiny:
        slice7b.shrink()
        a.passthrough.append("--tiny")
    return a


def main(argv: list[str] | None = None) -> None:
    """Build the checkpoints, run every tool on every workload, print the table."""
    a = parse(sys.argv[1:] if argv is None else argv)
    if a.worker:
        _worker(*a.worker, a, a.out)
        return
    a.root.mkdir(parents=True, exist_ok=True)
    workloads = a.workloads.split(",")
    slice7b.build_full(a.root, a.layers)
    slice7b.build_lora(a.root, a.layers)
    if "lora224" in workloads:
        slice7b.build_lora(a.root, 32)
    if "rss" in workloads and a.rss_layers != a.layers:
        slice7b.build_full(a.root / f"rss-{a.rss_layers}", a.rss_layers)
    cache = a.root / "runs"
    cache.mkdir(exist_ok=True)
    a.policy = _policy_in_worker()  # a first calibration happens here, before anything is timed
    print(f"deltaspec's CPU routes: {a.policy}", flush=True)
    refs = {}
    for w in ("matrix", "lora", "full"):
        if w in workloads:
            ref = run("reference", w, a, cache)
            refs[w] = ref.get("values", {})
    rows = []
    for w in workloads:
        for tool in WORKLOADS[w]:
            if tool in a.tools.split(","):
                rows.append(run(tool, w, a, cache))
                print(f"{w:8s} {tool:18s} " + (f"{rows[-1]['wall']:.2f} s" if "wall" in rows[-1]
                                                else rows[-1]["error"]), flush=True)
    text = table(rows, refs, a)
    print(text)
    report = a.report or a.root / f"results-{a.device.replace(':', '')}.md"
    report.write_text(text + "\n")
    print(f"\n(written to {report})")


if __name__ == "__main__":
    main()
