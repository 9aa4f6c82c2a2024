"""The training loop shared by pretraining, fine-tuning and the benchmarks.

AdamW, linear warm-up then cosine decay, gradient-norm clipping, a bounded thread count, and the
measurements every run reports: the loss curve, tokens/s (input positions, padding included, per
second of training) and peak memory (see :class:`MemoryMeter`).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TrainConfig
from .evaluate import IGNORE, MemoryMeter

Log = Callable[[str], None]


def default_threads() -> int:
    """Intra-op threads by default: 1.

    The reference model is small (128 wide), so a second thread buys little, and two OpenMP
    threads on a shared 2-core machine wait on each other at every barrier: measured here with
    other jobs running (load average 2-4), a pretraining step ran 3-8x slower with 2 threads than
    with 1. One thread also keeps tokens/s comparable between methods. Pass ``threads=2`` to use
    both cores of an otherwise idle machine.
    """
    return 1


@contextmanager
def thread_limit(n: int | None) -> Iterator[int]:
    """Use ``n`` intra-op threads (default :func:`default_threads`; never more than 2)."""
    before = torch.get_num_threads()
    want = max(1, min(n or default_threads(), 2, os.cpu_count() or 1))
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(before)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _loss_summary(losses: list[float], points: int = 40) -> dict:
    """First/final/min loss and a curve of window means (``points`` points at most)."""
    window = max(1, len(losses) // points)
    curve = [
        [i + window, sum(losses[i : i + window]) / len(losses[i : i + window])]
        for i in range(0, len(losses), window)
    ]
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first": losses[0], "final": sum(tail) / len(tail), "min": min(losses), "curve": curve}


def train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    log: Log | None = None,
) -> dict:
    """Run ``cfg.steps`` AdamW steps on ``params``; return loss, throughput and memory stats."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    meter, forward = MemoryMeter(model, device), logits_fn or model
    losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        inputs, labels = next(batches)
        with meter.forward():
            logits = forward(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        meter.after_step(opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += inputs.numel()
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"  step {step + 1}/{cfg.steps}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    return {"loss": _loss_summary(losses), "train_tokens": tokens, "train_time_s": seconds,
            "tokens_per_s": tokens / seconds, **meter.summary()}


def environment(device: torch.device | str, threads: int) -> dict:
    return {"device": str(device), "threads": threads, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count()}
