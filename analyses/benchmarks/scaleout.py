"""Scale-out benchmark: one ``compare``/``analyze`` with 1 process against N under ``torchrun``.

Builds (once) a Llama-shaped full fine-tune with ``slice7b`` (``--hidden``/``--inter`` shrink
the shapes so the CPU run stays in minutes), then times the same command as one process and
under ``torchrun --standalone --nproc-per-node=N`` for each N in ``--procs``, checks that every
run wrote the same rows, and prints a markdown table (CPU named) to paste into RESULTS.md.

    python analyses/benchmarks/scaleout.py --root /tmp/scaleout --layers 2 --procs 2
    # on a GPU machine: every GPU against one (the 224-module 7B-shaped compare)
    python analyses/benchmarks/scaleout.py --root /tmp/so --layers 32 --full-size --device cuda \\
        --procs "$(nvidia-smi -L | wc -l)"

With ``--device cpu`` each process gets ``cores / N`` threads, so the comparison is the same
machine split N ways, not N machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import slice7b  # noqa: E402


def cpu_name() -> str:
    """The CPU's model name (``lscpu``/``/proc/cpuinfo``) and its core count."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/deltaspec-scaleout"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2752)
    ap.add_argument("--full-size", action="store_true", help="the real 4096/11008 shapes")
    ap.add_argument("--procs", default="2", help="comma-separated process counts")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--command", choices=("compare", "analyze"), default="analyze")
    a = ap.parse_args()
    if not a.full_size:
        slice7b.shrink(a.hidden, a.inter)
    base, full = slice7b.build_full(a.root, a.layers, device="cpu")  # skipped when built
    cores = os.cpu_count() or 1
    args = ([a.command, str(full), "--base", str(base)] if a.command == "analyze"
            else [a.command, str(base), str(full)])
    rows: list[tuple[int, float]] = []
    outputs = []
    for n in [1, *(int(p) for p in a.procs.split(","))]:
        out = a.root / f"rows-{n}.json"
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // n)))
        cmd = ([sys.executable, "-m", "deltaspec"] if n == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={n}", "-m", "deltaspec"])
        rows.append((n, timed([*cmd, *args, "--device", a.device, "-q", "-o", str(out)], env)))
        outputs.append(json.loads(out.read_text()))
    same = all(o == outputs[0] for o in outputs)
    modules = len(outputs[0]["rows"]) if isinstance(outputs[0], dict) and "rows" in outputs[0] \
        else len(outputs[0])
    print(f"\n{a.command}, {modules} dense modules ({a.layers} layers, hidden {slice7b.HIDDEN}, "
          f"inter {slice7b.INTER}), device {a.device}; CPU: {cpu_name()}; "
          f"identical rows in every run: {same}\n")
    print("| processes | wall s | speed-up |\n|---|---|---|")
    for n, t in rows:
        print(f"| {n} | {t:.1f} | {rows[0][1] / t:.2f}× |")


if __name__ == "__main__":
    main()
