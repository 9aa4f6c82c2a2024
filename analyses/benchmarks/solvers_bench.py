"""The dense 4096² values candidates of issue 29, side by side on one ΔW, with their errors.

    python analyses/benchmarks/solvers_bench.py --root /tmp/deltaspec-bench     # Llama-7B q_proj
    python analyses/benchmarks/solvers_bench.py --quick                         # 1024², a dry run

ΔW is layer 0's q_proj of ``slice7b.py``'s fine-tune (bf16 tuned − bf16 base, 4096²). Each
candidate runs ``--repeat`` interleaved rounds; the best wall and the best process CPU time are
kept (on a shared machine the CPU time is the steadier number). Errors are max |σᵢ − σᵢ,ref| / σ₁
against numpy's float64 SVD (LAPACK ``dgesdd``):

  torch-f32-svdvals     torch.linalg.svdvals(float32): the peer (MKL sgesdd on x86)
  f64-gram              the float64 Gram (deltaspec's lower-tile product)
  mkl-syevd-f64         torch.linalg.eigvalsh(float64 Gram): MKL's syevd, every torch thread
  openblas-tridiag-1t   scipy dsytrd + dsterf on one OpenBLAS thread (deltaspec's ``tridiag``)
  openblas-tridiag-all  the same on every thread
  f32-certified         float32 gesdd with vectors + the float64 certificate, whole (its bound
                        is printed: the route uses the values only where bound ≤ 1e-6)
  deltaspec             deltaspec.spectrum() end to end with this machine's routes
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import profile_full  # noqa: E402
import slice7b  # noqa: E402


def _delta(root: Path) -> Any:
    """Layer 0's q_proj ΔW as stored: (tuned, base) bf16 tensors."""
    from safetensors import safe_open

    shard = "model-00001-of-00001.safetensors"
    key = "model.layers.0.self_attn.q_proj.weight"
    with safe_open(str(root / "full" / shard), framework="pt") as ft, \
            safe_open(str(root / "base" / shard), framework="pt") as bs:
        return ft.get_tensor(key), bs.get_tensor(key)


def candidates(tuned: Any, base: Any) -> dict[str, Callable[[], Any]]:
    """The timed calls; each returns σ (descending numpy float64) or None."""
    import torch

    from deltaspec.engine import lowprec, tridiag
    from deltaspec.engine.kernels import Operand, gram
    from deltaspec.engine.spectrum import spectrum

    op = Operand(tuple(tuned.shape), torch.device("cpu"), "q_proj",
                 dense=[(1.0, tuned), (-1.0, base)])
    dw32 = tuned.float() - base.float()  # exact: a difference of two bf16 fits float32
    g = gram(op)[0]
    every = torch.get_num_threads()

    def sig(lam: Any) -> np.ndarray:
        return np.sqrt(np.clip(np.sort(np.asarray(lam, dtype=np.float64))[::-1], 0, None))

    def f32() -> np.ndarray:
        got = lowprec.certified(op, promise=1.0)  # the whole certificate, never stopped early
        f32.bound = got.bound  # type: ignore[attr-defined]
        assert got.values is not None
        return got.values.numpy()

    return {
        "torch-f32-svdvals": lambda: torch.linalg.svdvals(dw32).double().numpy(),
        "f64-gram": lambda: gram(op) and None,
        "mkl-syevd-f64": lambda: sig(torch.linalg.eigvalsh(g).numpy()),
        "openblas-tridiag-1t": lambda: sig(tridiag.eigvals(g, threads=1).numpy()),
        "openblas-tridiag-all": lambda: sig(tridiag.eigvals(g, threads=every).numpy()),
        "f32-certified": f32,
        "deltaspec": lambda: spectrum(dw32, device="cpu").values.numpy(),
    }


def main(argv: list[str] | None = None) -> None:
    """Time every candidate, print the table and the machine."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/deltaspec-bench"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1024² instead of 4096²")
    a = ap.parse_args(argv)
    if a.quick:
        slice7b.shrink(1024, 2752)
        a.root = a.root.with_name(a.root.name + "-quick")
    a.root.mkdir(parents=True, exist_ok=True)
    slice7b.build_full(a.root, 1)
    tuned, base = _delta(a.root)
    ref = np.linalg.svd(tuned.double().numpy() - base.double().numpy(), compute_uv=False)
    runs = candidates(tuned, base)
    wall = dict.fromkeys(runs, np.inf)
    cpu = dict.fromkeys(runs, np.inf)
    err: dict[str, float] = {}
    for _ in range(a.repeat):  # interleaved: a change of load hits every candidate alike
        for name, fn in runs.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out = fn()
            wall[name] = min(wall[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
            if out is not None:
                err[name] = float(np.abs(out - ref).max() / ref[0])
            print(f"{name:22s} {wall[name]:8.2f} s", file=sys.stderr, flush=True)
    bound = getattr(runs["f32-certified"], "bound", float("nan"))
    print(f"| candidate ({tuned.shape[0]}×{tuned.shape[1]}) | best wall s | best CPU s | "
          "max err σ/σ₁ |\n|---|---:|---:|---:|")
    for name in runs:
        e = f"{err[name]:.1e}" if name in err else ""
        if name == "f32-certified":
            e += f" (certified bound {bound:.1e}: {'used' if bound <= 1e-6 else 'refused'})"
        print(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | {e} |")
    from deltaspec.engine import solvers

    pol = solvers.policy(4096)
    print(f"\nMachine: {profile_full.machine_line()}; best of {a.repeat} interleaved rounds; "
          f"deltaspec's routes: values={pol.values} ({pol.source})")


if __name__ == "__main__":
    main()
