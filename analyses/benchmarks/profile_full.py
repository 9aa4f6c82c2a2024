"""Where each second of a full fine-tune ``analyze --base`` goes on this CPU (issue 29).

    python analyses/benchmarks/profile_full.py --root /tmp/deltaspec-bench --layers 1
    python analyses/benchmarks/profile_full.py --quick      # quarter-scale shapes, a dry run

Runs deltaspec's own ``run_paths`` (every default column: σ, top-8 vectors for amplification,
relative_norm) on the 7B-shaped slice of ``slice7b.py`` with the engine's stages wrapped by
timers. Each stage's time is *exclusive* (a stage called inside another counts for itself only)
and kept per thread: the pipeline's prefetch worker reads the next module and forms its Gram
while the main thread solves, so the worker's column overlaps the main thread's. Stages:

  read + widen     ``Operand._block``: page faults of the mapped bf16 files and bf16 → float64
  gram             the float64 Gram matrix (``kernels.gram``)
  eigensolve       all eigenvalues: ``dsytrd`` + ``dsterf`` (scipy) or ``syevd`` (torch/MKL)
  top-8 vectors    inverse iteration + back-transform, and U = ΔW·V/σ
  base-relative    ‖W‖_F and U_rᵀ·W·V_r (relative_norm, amplification)
  waiting for the worker   the main thread blocked on the next module's reads and Gram
  Python + rest    the main thread's wall time not in any stage (metrics, rows, loaders, waits)

Prints a markdown table plus the machine (CPU, flags, BLAS of torch/numpy/scipy, load) and the
solver routes; ``--intruders`` adds the intruder count's base decomposition.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import slice7b  # noqa: E402

STAGES = ("read + widen", "gram", "eigensolve", "top-8 vectors", "base-relative", "intruders",
          "waiting for the worker")
_LOCAL = threading.local()
TOTALS: dict[tuple[str, str], float] = defaultdict(float)  # (thread, stage) → exclusive seconds


def _timed(fn: Callable[..., Any], stage: str, inherit: bool = False) -> Callable[..., Any]:
    """``fn`` with its exclusive time added to ``stage`` (``inherit``: to the enclosing stage
    when there is one, e.g. a product inside base-relative work)."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = _LOCAL.__dict__.setdefault("stack", [])
        label = stack[-1][0] if inherit and stack else stage
        frame = [label, 0.0]  # [stage, seconds spent in inner stages]
        stack.append(frame)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.perf_counter() - t0
            stack.pop()
            TOTALS[(threading.current_thread().name, label)] += spent - frame[1]
            if stack:
                stack[-1][1] += spent
    return wrapper


def instrument() -> None:
    """Wrap the engine's stages (module attributes and the names other modules imported)."""
    from concurrent import futures

    from deltaspec.engine import dense, kernels, relative, tridiag

    kernels.Operand._block = _timed(kernels.Operand._block, "read + widen")
    for name in ("mm", "rmm"):
        setattr(kernels.Operand, name, _timed(getattr(kernels.Operand, name), "top-8 vectors",
                                              inherit=True))
    kernels.Operand.fro2 = _timed(kernels.Operand.fro2, "base-relative")
    gram = _timed(kernels.gram, "gram")
    for mod in (kernels, dense, relative):
        mod.gram = gram  # type: ignore[attr-defined]
    tridiag.reduce = _timed(tridiag.reduce, "eigensolve", inherit=True)
    tridiag.values = _timed(tridiag.values, "eigensolve", inherit=True)
    tridiag.tridiagonal_top = _timed(tridiag.tridiagonal_top, "top-8 vectors", inherit=True)
    tridiag.back_transform = _timed(tridiag.back_transform, "top-8 vectors", inherit=True)
    dense.eigvalsh_desc = _timed(dense.eigvalsh_desc, "eigensolve")
    dense.eigh_desc = _timed(dense.eigh_desc, "top-8 vectors")
    relative.projection = _timed(relative.projection, "base-relative")
    relative.intruder_cosines = _timed(relative.intruder_cosines, "intruders")
    futures.Future.result = _timed(futures.Future.result, "waiting for the worker")


def machine_line() -> str:
    """CPU model and flags, cores, BLAS of each library, load average."""
    from deltaspec.machine import blas_libraries, cpu_flags, cpu_model

    flags = " ".join(sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"}))
    blas = ", ".join(f"{k}: {v}" for k, v in blas_libraries().items())
    return (f"{cpu_model()} ({flags}), {os.cpu_count()} cores; {blas}; load average "
            f"{os.getloadavg()[0]:.1f}")


def table(wall: float, cpu: float, modules: int) -> str:
    """The stages as markdown: main thread, prefetch worker, main thread's share of the wall."""
    threads = sorted({t for t, _ in TOTALS})
    main = "MainThread"
    workers = [t for t in threads if t != main]
    lines = ["| stage | main thread s | prefetch worker s | share of wall |",
             "|---|---:|---:|---:|"]
    attributed = 0.0
    for stage in STAGES:
        mine = TOTALS.get((main, stage), 0.0)
        other = sum(TOTALS.get((t, stage), 0.0) for t in workers)
        if mine or other:
            attributed += mine
            lines.append(f"| {stage} | {mine:.2f} | {other:.2f} | {100 * mine / wall:.0f} % |")
    rest = wall - attributed
    lines.append(f"| Python + rest (main thread) | {rest:.2f} | | {100 * rest / wall:.0f} % |")
    lines.append(f"| **analyze, {modules} modules** | **{wall:.2f} wall** | | process CPU "
                 f"{cpu:.2f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Build the slice if needed, analyze it with the stages timed, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/deltaspec-bench"))
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="quarter-scale shapes (1024/2752)")
    ap.add_argument("--intruders", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        slice7b.shrink(1024, 2752)
        a.root = a.root.with_name(a.root.name + "-quick")
    a.root.mkdir(parents=True, exist_ok=True)
    slice7b.build_full(a.root, a.layers)
    import deltaspec
    from deltaspec.analyze import run_paths
    from deltaspec.engine import solvers

    pol = solvers.policy(4096)
    instrument()
    opts = deltaspec.Options(device="cpu", intruders=a.intruders)
    c0, t0 = time.process_time(), time.perf_counter()
    result = run_paths(a.root / "full", None, a.root / "base", opts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(table(wall, cpu, len(result.table)))
    print(f"\nMachine: {machine_line()}; routes: values={pol.values}, vectors={pol.vectors} "
          f"({pol.source}{': ' + pol.note if pol.note else ''}); shapes: "
          f"{'quarter scale' if a.quick else 'Llama-7B'}, {a.layers} layer(s)")


if __name__ == "__main__":
    main()
