"""The health checks' costs, each beside the obvious alternative in the same run:

  alpha      heavy_tail.alpha on an ESD of n eigenvalues against powerlaw.Fit (α uncapped)
  merge      the lost_in_bf16 / bf16_merge_error pass over an n×n bf16 W and ΔW against the
             values-only spectrum solve of the same ΔW (what the analysis spends anyway)
  verify     verify-merge of a PEFT LoRA (r=16) merged into a Llama-shaped model (hidden --hidden,
             --layers layers, 7 modules per layer), float32 and bf16, end to end from the folders

    nice -n 10 python analyses/benchmarks/health_bench.py [--n 2048] [--hidden 1024 --layers 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def bench_alpha(n: int) -> list[str]:
    import powerlaw

    from deltaspec.metrics.heavy_tail import esd, fit_power_law

    rng = np.random.default_rng(0)
    w = rng.standard_normal((n, n)) + 0.3 * rng.standard_t(2.5, (n, n))
    lam = esd(np.linalg.svd(w, compute_uv=False), w.shape)
    ours, t1 = timed(lambda: fit_power_law(lam)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, t2 = timed(lambda: powerlaw.Fit(lam, verbose=False,
                                             parameter_ranges={"alpha": [1, None]}).alpha)
    return [f"| alpha, ESD of {lam.size} | {t1:.3f} s | powerlaw {t2:.2f} s | "
            f"{t2 / t1:.0f}x | α {ours:.4f} vs {ref:.4f} |"]


def bench_merge(n: int) -> list[str]:
    from deltaspec.engine.health import merge_rounding
    from deltaspec.engine.kernels import Operand
    from deltaspec.engine.spectrum import solve_dense

    g = torch.Generator().manual_seed(0)
    w = (0.02 * torch.randn(n, n, generator=g)).to(torch.bfloat16)
    t = (w.float() + 1e-3 * torch.randn(n, n, generator=g)).to(torch.bfloat16)
    cpu = torch.device("cpu")
    op = Operand((n, n), cpu, "ΔW", dense=[(1.0, t), (-1.0, w)])
    base = Operand((n, n), cpu, "W", dense=[(1.0, w)])
    solve_dense(op, 0)  # the solver's one-off calibration, not timed
    (lost, entries, _, _), t1 = timed(lambda: merge_rounding(base, op))
    _, t2 = timed(lambda: solve_dense(op, 0))
    return [f"| merge columns, {n}² bf16 | {t1:.2f} s | values solve {t2:.2f} s | "
            f"{t1 / t2:.2f} of the solve | lost {lost / entries:.3f} |"]


def bench_verify(hidden: int, layers: int) -> list[str]:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltaspec.act.verify import verify_merge

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(cfg).eval()
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=16, lora_alpha=32, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model.save_pretrained(root / "base")
        pm.save_pretrained(root / "adapter")
        merged = copy.deepcopy(pm).merge_and_unload()
        merged.save_pretrained(root / "merged")
        merged.to(torch.bfloat16).save_pretrained(root / "merged_bf16")
        for name in ("merged", "merged_bf16"):
            checks, t = timed(lambda n=name: verify_merge(root / n, root / "adapter", root / "base"))
            ok = sum(c.holds for c in checks)
            worst = max(c.residual / c.bound for c in checks)
            out.append(f"| verify-merge {name}, {len(checks)} modules, hidden {hidden} | {t:.2f} s | "
                       f"– | – | {ok}/{len(checks)} merged, max residual/bound {worst:.3f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    print("| workload | deltaspec | alternative | ratio | check |")
    print("|---|---|---|---|---|")
    for line in [*bench_alpha(min(a.n, 1024)), *bench_merge(a.n), *bench_verify(a.hidden, a.layers)]:
        print(line, flush=True)


if __name__ == "__main__":
    main()
