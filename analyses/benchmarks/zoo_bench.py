"""``deltaspec zoo`` at scale: N rank-16 PEFT LoRA adapters on the 7B-shaped modules, beside the
obvious alternatives, in one run.

    python analyses/benchmarks/zoo_bench.py --n 100 --layers 32   # full: 224 modules, ~8 GB
    python analyses/benchmarks/zoo_bench.py --n 100 --layers 1    # 1/32 of the modules

Rows (every time on this machine, in this run):
  zoo       ``deltaspec zoo`` end to end (a fresh process: load, stream, solve, write the folder),
            wall time and peak RSS; the cost per module does not depend on the number of layers,
            so the full 224-module time is extrapolated linearly from a fraction (said so).
  compare   N(N−1)/2 ``deltaspec.compare`` calls (the pairwise tool run on every pair): a few
            pairs timed, extrapolated to all pairs.
  numpy     dense float64 numpy: ΔW = B·A formed, ``np.linalg.svd`` per update and module (for
            φ), ``np.vdot`` per pair (the cosine): vdot timed on one 4096² module of 2 adapters,
            the SVD on a --block² corner (a 4096² one takes minutes on a shared CPU), both
            extrapolated (SVD by m·n·min(m, n)) to every module, update and pair.
The zoo's cosine on that module is checked against numpy's (|error|).
Adapters are generated deterministically (5 planted groups: a shared centre plus noise), bf16 on
disk; ``--keep`` leaves them, else they are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
import slice7b  # noqa: E402
from bench import machine  # noqa: E402

GROUPS = 5
R = 16


def make_adapters(root: Path, n: int, layers: int, r: int = R, seed: int = 0) -> list[Path]:
    """``root/adapter-XXX``: n PEFT LoRA folders (bf16) in GROUPS planted groups, deterministic."""
    folders = []
    for j in range(n):
        folder = root / f"adapter-{j:03d}"
        folders.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(layers):
            for mod, (m, w) in slice7b.MODULES.items():
                centre = torch.Generator().manual_seed(seed * 7919 + (j % GROUPS) * 1009 + i * 31
                                                       + list(slice7b.MODULES).index(mod))
                own = torch.Generator().manual_seed(10**6 + seed * 7919 + j * 1009 + i * 31
                                                    + list(slice7b.MODULES).index(mod))
                a = torch.randn(r, w, generator=centre) + 0.7 * torch.randn(r, w, generator=own)
                b = 1e-2 * (torch.randn(m, r, generator=centre) + 0.7 * torch.randn(m, r, generator=own))
                prefix = f"base_model.model.model.layers.{i}.{mod}"
                tensors[f"{prefix}.lora_A.weight"] = (a / w**0.5).to(torch.bfloat16).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
        (folder / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
             "target_modules": sorted({k.split(".")[-1] for k in slice7b.MODULES}),
             "base_model_name_or_path": "llama-7b-shaped"}))
    return folders


def _child(code: str) -> dict:
    """Run python ``code`` in a fresh process; it prints one JSON line (plus its VmHWM)."""
    wrapped = (code + "\nimport json, pathlib\nhwm = [l for l in pathlib.Path('/proc/self/status')"
               ".read_text().splitlines() if l.startswith('VmHWM')][0].split()[1]\n"
               "print(json.dumps(dict(RESULT, rss_mb=int(hwm) / 1024)))\n")
    out = subprocess.run([sys.executable, "-c", wrapped], check=True, capture_output=True,
                         text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_zoo(folders: list[Path], out: Path) -> dict:
    """``deltaspec zoo`` end to end in a fresh process (the CLI's own code path)."""
    args = [str(f) for f in folders] + ["--out", str(out), "-q", "--format", "json"]
    code = ("import time, sys\nfrom click.testing import CliRunner\nfrom deltaspec.cli import main\n"
            f"t = time.perf_counter()\nr = CliRunner().invoke(main, ['zoo', *{args!r}])\n"
            "assert r.exit_code == 0, r.output\n"
            "RESULT = dict(wall=time.perf_counter() - t)")
    return _child(code)


def run_compare(folders: list[Path], pairs: int) -> dict:
    """A few ``deltaspec.compare`` calls (every module, K = 8), timed per pair."""
    code = ("import time, deltaspec\n"
            f"fs = {[str(f) for f in folders]!r}\nts = []\n"
            f"for i in range({pairs}):\n"
            "    t = time.perf_counter(); deltaspec.compare(fs[i], fs[i + 1], discover_base=False)\n"
            "    ts.append(time.perf_counter() - t)\n"
            "RESULT = dict(per_pair=sorted(ts)[len(ts) // 2])")
    return _child(code)


def run_numpy(folders: list[Path], module: str, block: int = 1024) -> tuple[float, float, float]:
    """Dense float64 numpy on one module of 2 adapters: ΔW = B·A formed, ``np.vdot`` for the
    cosine (timed per pair), ``np.linalg.svd`` timed on a block × block corner of ΔW (a full 4096²
    SVD takes minutes on a shared CPU). Returns (s per SVD of the block, s per pair, cosine)."""
    import deltaspec

    mats = []
    for f in folders[:2]:
        b, a = deltaspec.load(f, discover_base=False)[module].factors(torch.float64)
        mats.append((b @ a).numpy())
    t = time.perf_counter()
    np.linalg.svd(mats[0][:block, :block], full_matrices=False)
    per_svd = time.perf_counter() - t
    t = time.perf_counter()
    cos = float(np.vdot(mats[0], mats[1]) / np.linalg.norm(mats[0]) / np.linalg.norm(mats[1]))
    return per_svd, time.perf_counter() - t, cos


def accuracy(out: Path, folders: list[Path], module: str, cos: float) -> float:
    """|zoo − dense float64 numpy| of the subset's cosine."""
    import pandas as pd

    pairs = pd.read_csv(out / "pairs.csv").set_index(["a", "b", "module"])
    return abs(float(pairs.loc[(folders[0].name, folders[1].name, module), "cosine"]) - cos)


def main(argv: list[str] | None = None) -> None:
    """Generate the adapters, run the three tools, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/zoo-bench"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layers", type=int, default=2, help="of 32 (224 modules at 32)")
    ap.add_argument("--pairs", type=int, default=3, help="compare calls timed")
    ap.add_argument("--block", type=int, default=1024, help="side of the numpy SVD timed")
    ap.add_argument("--keep", action="store_true", help="keep the generated adapters")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    folders = make_adapters(a.root, a.n, a.layers)
    gen = time.perf_counter() - t
    size = sum(f.stat().st_size for p in folders for f in p.iterdir()) / 2**30
    modules, full_modules, pairs = 7 * a.layers, 224, a.n * (a.n - 1) // 2
    scale = full_modules / modules
    zoo = run_zoo(folders, a.root / "out")
    cmp_ = run_compare(folders, a.pairs)
    module = "model.layers.0.self_attn.q_proj"
    per_svd, per_pair, cos = run_numpy(folders, module, a.block)
    err = accuracy(a.root / "out", folders, module, cos)
    work = sum(m * w * min(m, w) for m, w in slice7b.MODULES.values()) * 32 / a.block**3  # in block² SVDs
    numpy_full = a.n * work * per_svd + pairs * full_modules * per_pair * (sum(
        m * w for m, w in slice7b.MODULES.values()) / 7 / 4096**2)
    print(f"\nzoo benchmark — {machine()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"N = {a.n} rank-{R} adapters (bf16, {size:.2f} GiB on disk, made in {gen:.0f} s), "
          f"{a.layers} of 32 layers = {modules} of 224 modules; {pairs} pairs\n")
    print(f"| tool | measured | wall s (measured) | peak RSS MB | N = {a.n}, 224 modules (s) | how |")
    print("|---|---|---:|---:|---:|---|")
    print(f"| deltaspec zoo | {a.n} × {modules} modules | {zoo['wall']:.1f} | {zoo['rss_mb']:.0f} | "
          f"{zoo['wall'] * scale:.0f} | measured × {scale:g} (modules) |")
    every = cmp_["per_pair"] * pairs * scale
    print(f"| {pairs} × deltaspec compare | {a.pairs} pairs × {modules} modules | "
          f"{cmp_['per_pair']:.2f} per pair | {cmp_['rss_mb']:.0f} | {every:.0f} | "
          f"median pair × {pairs} pairs × {scale:g}: extrapolated |")
    print(f"| dense float64 numpy (svd + vdot) | SVD of a {a.block}² block; vdot of 2 × 4096² | "
          f"{per_svd:.2f} per SVD, {per_pair * 1e3:.0f} ms per pair | – | {numpy_full:.0f} | SVD time "
          f"× m·n·min(m,n) over every module and adapter, + vdot per pair and module: extrapolated |")
    print(f"\nzoo vs dense float64 numpy (np.vdot of the formed ΔW), one 4096² module: "
          f"|Δ cosine| = {err:.1e}")
    if not a.keep:
        shutil.rmtree(a.root, ignore_errors=True)


if __name__ == "__main__":
    main()
