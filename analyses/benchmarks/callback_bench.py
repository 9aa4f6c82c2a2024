"""Overhead of ``deltaspec.callbacks.SpectralCallback`` on a small transformers Trainer LoRA run.

A Llama-shaped model (``--hidden``, ``--layers``; random init, nothing downloaded) with a PEFT
LoRA adapter on all seven linear kinds is trained on random tokens by the genuine ``Trainer``
twice in one process: without the callback (the step time: median interval between optimiser
steps) and with it logging every ``--probe`` steps (the cost of one log point: median time of
the monitor's measurement inside the loop, and the end-to-end run time). The overhead at an
interval N is (cost of one log point) / (N × step time); the table gives it at the callback's
default interval and at the probe's. Run with ``nice -n 10`` on a shared machine:

    nice -n 10 python analyses/benchmarks/callback_bench.py            # ~2 min on 2 cores
    nice -n 10 python analyses/benchmarks/callback_bench.py --steps 40 --hidden 128 --layers 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback


def build(hidden: int, layers: int, rank: int, seed: int = 0):
    """The small model with its LoRA adapter (PeftModel)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 32 * 32,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=512)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=rank, lora_alpha=2 * rank,
                                                            target_modules=targets))


class StepClock(TrainerCallback):
    """Records the time at each optimiser step's end."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.times.append(time.perf_counter())


def train(args, callbacks) -> float:
    """One Trainer run; returns its wall time."""
    from transformers import Trainer, TrainingArguments

    model = build(args.hidden, args.layers, args.rank)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (args.steps * args.batch, args.seq), generator=g)
    data = [{"input_ids": x, "labels": x} for x in ids]
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, save_strategy="no",
                                  per_device_train_batch_size=args.batch, learning_rate=1e-3,
                                  report_to=[], logging_steps=10**9, use_cpu=True,
                                  disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=list(callbacks))
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    from deltaspec.callbacks import SpectralCallback
    from deltaspec.callbacks.monitor import DEFAULT_EVERY
    from deltaspec.machine import cpu_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--probe", type=int, default=10, help="log interval of the measured run")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    clock = StepClock()
    wall_off = train(args, [clock])
    gaps = [b - a for a, b in zip(clock.times[5:], clock.times[6:], strict=False)]
    step_s = statistics.median(gaps)

    cb = SpectralCallback(every=args.probe)
    costs: list[float] = []
    real = cb.monitor.step

    def timed(model, step):
        t = time.perf_counter()
        out = real(model, step)
        costs.append(time.perf_counter() - t)
        return out

    cb.monitor.step = timed  # type: ignore[method-assign]
    wall_on = train(args, [cb])
    log_s = statistics.median(costs)
    modules = sum(1 for k in cb.monitor.prev)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{args.threads} threads; model hidden {args.hidden}, {args.layers} layers, LoRA r="
          f"{args.rank} on {modules} modules; batch {args.batch} × {args.seq} tokens\n")
    print("| quantity | value |\n|---|---:|")
    print(f"| step time (median, no callback) | {step_s * 1e3:.1f} ms |")
    print(f"| one log point (median of {len(costs)}, in the loop) | {log_s * 1e3:.1f} ms |")
    for every in (DEFAULT_EVERY, args.probe):
        print(f"| overhead at every={every} | {100 * log_s / (every * step_s):.2f} % |")
    print(f"| {args.steps}-step run: without / with every={args.probe} | {wall_off:.1f} s / "
          f"{wall_on:.1f} s |")


if __name__ == "__main__":
    main()
