"""Benchmark: `deltaspec check` on a 7B-shaped LoRA adapter costs about what `analyze` costs.

Writes a synthetic PEFT adapter shaped like a Llama-2-7B LoRA (32 layers × q,k,v,o (4096×4096),
gate, up (11008×4096), down (4096×11008); r = 16, bfloat16) into a temporary folder, then times
`analyze`, `snapshot` and `check` (exact float16 vectors and a 256-row sketch) and prints a
table with the baseline sizes::

    python analyses/ci-example/bench_7b.py [--rank 16] [--layers 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import deltaspec
from deltaspec.analyze import run_paths
from deltaspec.gate.check import run_check
from deltaspec.gate.snapshot import read_baseline, take_snapshot, write_baseline
from deltaspec.options import Options

SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096),
          "self_attn.v_proj": (4096, 4096), "self_attn.o_proj": (4096, 4096),
          "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
          "mlp.down_proj": (4096, 11008)}


def write_adapter(folder: Path, layers: int, rank: int) -> Path:
    """A PEFT LoRA folder with random bfloat16 factors of 7B shapes."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for mod, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{i}.{mod}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) / inp ** 0.5
                                               ).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.01
                                               ).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted({m.rsplit(".", 1)[1] for m in SHAPES}),
              "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def timed(fn, repeat: int = 2):
    """(best wall time of ``repeat`` runs, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_adapter(Path(tmp) / "adapter", args.layers, args.rank)
        dev, rep = args.device, args.repeat
        rows = [("analyze", *timed(lambda: deltaspec.analyze(adapter, device=dev), rep), ""),
                ("analyze (with top-8 vectors)", *timed(lambda: run_paths(adapter, opts=Options(
                    device=dev, vectors=True, keep_spectra=True)), rep), "")]
        for sketch in (0, 256):
            out = Path(tmp) / f"baseline-{sketch}.json"
            t, b = timed(lambda s=sketch: take_snapshot(adapter, device=dev, sketch=s), rep)
            write_baseline(b, out)
            size = f"{os.path.getsize(out) / 1e6:.1f} MB"
            label = "exact" if not sketch else f"sketch {sketch}"
            rows.append((f"snapshot ({label})", t, b, size))
            t_read, loaded = timed(lambda o=out: read_baseline(o), rep)
            rows.append((f"read baseline ({label})", t_read, loaded, ""))
            t, outcome = timed(lambda lo=loaded: run_check(adapter, lo, device=dev), rep)
            assert outcome.ok, outcome.failures[:3]
            rows.append((f"check ({label}, incl. analysis)", t, outcome, ""))
    print(f"7B-shaped LoRA: {args.layers * len(SHAPES)} modules, r = {args.rank}, "
          f"device {args.device}, {torch.get_num_threads()} threads, best of {args.repeat}")
    print(f"{'step':<34}{'seconds':>9}  baseline size")
    for name, t, _, size in rows:
        print(f"{name:<34}{t:>9.2f}  {size}")


if __name__ == "__main__":
    main()
