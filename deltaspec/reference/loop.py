"""The training loop shared by pretraining, fine-tuning and the benchmarks.

AdamW, linear warm-up then cosine decay, gradient-norm clipping, a bounded thread count, and the
measurements every run reports: the loss curve, tokens/s (input positions, padding included, per
second of training) and peak memory (see :class:`MemoryMeter`).
"""

from __future__ import annotations

import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .configs import TrainConfig
from .evaluate import IGNORE, MemoryMeter
from .machine import default_threads

Log = Callable[[str], None]


def seed_everything(seed: int) -> None:
    """Seed every random source the reference uses (Python's ``random`` and torch, all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextmanager
def thread_limit(n: int | None) -> Iterator[int]:
    """Run with ``n`` intra-op threads (default :func:`default_threads`) and deterministic kernels.

    Same seed, same thread count, same machine → bit-identical results: the thread count fixes
    how reductions are split, and ``torch.use_deterministic_algorithms`` rules out the kernels
    (mostly CUDA ones) whose results depend on scheduling. Both settings are restored on exit.
    """
    if n is not None and n < 1:
        raise ValueError(f"threads must be >= 1 (got {n})")
    before, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    want = n or default_threads()
    torch.set_num_threads(want)
    torch.use_deterministic_algorithms(True)
    if torch.cuda.is_available():  # cuBLAS needs a fixed workspace to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    try:
        yield want
    finally:
        torch.set_num_threads(before)
        torch.use_deterministic_algorithms(det)


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


class EarlyStop:
    """Patience on a held-out loss: evaluate every ``cfg.eval_every`` steps, keep the best
    trainable parameters; after ``cfg.patience`` evaluations without an improvement of more than
    ``cfg.min_delta``, scale the learning rate by ``cfg.lr_drop_factor`` (``cfg.lr_drops`` times
    at most), then stop; restore the best parameters at the end."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig,
                 evaluate: Callable[[], float] | None) -> None:
        self.params, self.cfg, self.evaluate = params, cfg, evaluate
        self.on = evaluate is not None and cfg.eval_every > 0
        self.best, self.best_step, self.bad = math.inf, 0, 0
        self.curve: list[list[float]] = []
        self.saved: list[torch.Tensor] = []
        self.lr_scale = 1.0  # the plateau factor (read by the schedule)
        self.drops_at: list[int] = []  # the steps at which the learning rate dropped

    def check(self, step: int, model: nn.Module) -> bool:
        """After ``step`` steps: evaluate when due; True when training should stop."""
        if not self.on or step % self.cfg.eval_every or self.evaluate is None:
            return False
        model.eval()
        loss = float(self.evaluate())
        model.train()
        self.curve.append([step, loss])
        if loss < self.best - self.cfg.min_delta:
            self.best, self.best_step, self.bad = loss, step, 0
            self.saved = [p.detach().clone() for p in self.params]
        else:
            self.bad += 1
        if self.cfg.patience <= 0 or self.bad < self.cfg.patience:
            return False
        if len(self.drops_at) < self.cfg.lr_drops:  # a plateau: lower the rate and go on
            self.lr_scale *= self.cfg.lr_drop_factor
            self.drops_at.append(step)
            self.bad = 0
            return False
        return True

    def finish(self, steps_run: int) -> dict:
        """Restore the best parameters; the early-stopping record for the metrics."""
        if not self.on:
            return {}
        if self.saved:
            with torch.no_grad():
                for p, best in zip(self.params, self.saved, strict=True):
                    p.copy_(best)
        return {"early_stopping": {"eval_every": self.cfg.eval_every, "patience": self.cfg.patience,
                                   "max_steps": self.cfg.steps, "steps_run": steps_run,
                                   "best_step": self.best_step, "best_heldout_loss": self.best,
                                   "lr_drops_at": self.drops_at, "heldout_loss_curve": self.curve}}


def train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    log: Log | None = None,
    evaluate: Callable[[], float] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict:
    """Run up to ``cfg.steps`` AdamW steps on ``params``; return loss, throughput and memory stats.

    With ``evaluate`` (→ held-out loss) and ``cfg.eval_every`` > 0, training stops early by
    patience and ends on the best evaluated parameters (see :class:`EarlyStop`). ``on_step(n)``
    is called after the n-th optimiser step (its time is not counted in tokens/s).
    """
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    stopper = EarlyStop(params, cfg, evaluate)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg) * stopper.lr_scale)
    meter, forward = MemoryMeter(model, device), logits_fn or model
    losses: list[float] = []
    tokens, start, eval_s = 0, time.perf_counter(), 0.0
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
        meter.after_step(opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += inputs.numel()
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"  step {step + 1}/{cfg.steps}  loss {losses[-1]:.4f}")
        t_eval = time.perf_counter()
        if on_step is not None:
            on_step(step + 1)
        stop = stopper.check(step + 1, model)  # may lower lr_scale: the next step's rate
        eval_s += time.perf_counter() - t_eval
        sched.step()
        if stop:
            if log:
                log(f"  early stop at step {step + 1} (best held-out loss at {stopper.best_step})")
            break
    seconds = time.perf_counter() - start - eval_s
    model.eval()
    return {"loss": _loss_summary(losses), "train_tokens": tokens, "train_time_s": seconds,
            "tokens_per_s": tokens / seconds, "steps_run": len(losses), **meter.summary(),
            **stopper.finish(len(losses))}


def environment(device: torch.device | str, threads: int) -> dict:
    return {"device": str(device), "threads": threads, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count()}
