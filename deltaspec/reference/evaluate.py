"""Batching, held-out evaluation and memory accounting for the training reference.

Exact-match accuracy of the greedy completion is computed with one teacher-forced forward pass:
the greedy completion of a prompt equals ``answer + EOS`` exactly when, at every answer position,
the argmax of the logits (given the prompt and the *correct* earlier answer tokens) is the correct
token. (If all argmaxes agree, greedy decoding reproduces the answer token by token; at the first
position where one disagrees, greedy decoding emits that wrong token.) This is the same number as
generating and comparing strings, at the cost of a single forward pass per batch.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .data import Example

IGNORE = -100
Encoder = Callable[[Example], tuple[list[int], int]]
"""Example → (token ids of prompt + answer + eos, number of prompt tokens)."""


def max_rss_mb() -> float:
    """This process's peak resident set size in MiB: VmHWM from /proc where it exists (Linux's
    ``ru_maxrss`` would carry the spawning parent's high-water mark across exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    per_mib = 1 << 20 if sys.platform == "darwin" else 1 << 10  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib


def collate(
    encoded: list[tuple[list[int], int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels), both (B, T−1); labels are IGNORE except on the answer."""
    width = max(len(ids) for ids, _ in encoded) - 1
    inputs = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(encoded):
        seq = torch.tensor(ids, dtype=torch.long)
        inputs[i, : len(ids) - 1] = seq[:-1]
        # position j predicts token j + 1: supervise the answer and EOS tokens only
        labels[i, n_prompt - 1 : len(ids) - 1] = seq[n_prompt:]
    return inputs.to(device), labels.to(device)


def finetune_batches(
    train: dict[str, list[tuple[list[int], int]]],
    batch_size: int,
    seed: int,
    pad_id: int,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches of the mixture: tasks drawn uniformly, then an example of that task."""
    rng = random.Random(seed)
    tasks = sorted(train)
    while True:
        chosen = [rng.choice(train[rng.choice(tasks)]) for _ in range(batch_size)]
        yield collate(chosen, pad_id, device)


def lm_batches(
    tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of a token stream: (inputs, next-token labels), both (B, seq_len)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size,), generator=gen)
        windows = torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        yield windows[:, :-1].to(device), windows[:, 1:].to(device)


@torch.no_grad()
def exact_match(
    model: Callable[[torch.Tensor], torch.Tensor],
    encoded: list[tuple[list[int], int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
) -> float:
    """Share of examples whose greedy completion is exactly ``answer`` (teacher-forced, above)."""
    if not encoded:
        return float("nan")
    correct = 0
    for start in range(0, len(encoded), batch_size):
        inputs, labels = collate(encoded[start : start + batch_size], pad_id, device)
        pred = model(inputs).argmax(-1)  # (B, T)
        ok = ((pred == labels) | (labels == IGNORE)).all(dim=1)
        correct += int(ok.sum())
    return correct / len(encoded)


@torch.no_grad()
def answer_loss(
    model: Callable[[torch.Tensor], torch.Tensor],
    encoded: list[tuple[list[int], int]],
    pad_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 128,
) -> float:
    """Mean teacher-forced cross-entropy of the answer (and EOS) tokens of ``encoded``."""
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        inputs, labels = collate(encoded[start : start + batch_size], pad_id, device)
        logits = model(inputs)  # (B, T, V)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((labels != IGNORE).sum())
    return total / max(1, count)


def evaluate_tasks(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    examples: dict[str, list[Example]],
    encode: Encoder,
    pad_id: int,
    device: torch.device | str = "cpu",
    limit: int | None = None,
) -> dict[str, float]:
    """Exact-match accuracy per task (first ``limit`` examples of each task when given)."""
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        return {
            task: exact_match(model, [encode(e) for e in exs[:limit]], pad_id, device)
            for task, exs in examples.items()
        }
    finally:
        if isinstance(model, nn.Module) and was_training:
            model.train()


class MemoryMeter:
    """Peak training memory.

    On CUDA: ``torch.cuda.max_memory_allocated`` over the run. On CPU, where PyTorch keeps no
    allocator statistics, live tensor bytes are accounted directly: parameters + gradients +
    optimizer state (measured from the tensors after a step) + the tensors autograd saves for the
    backward pass (measured every step with ``saved_tensors_hooks``, deduplicated by storage and
    excluding parameters) — an upper bound on live tensor memory at the start of backward.
    The process-wide max RSS is reported as well, for reference.
    """

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.params = list(model.parameters())
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in self.params}
        self.activation_peak = 0
        self.grad_bytes = 0
        self.optimizer_bytes = 0
        self.rss_start = max_rss_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Wrap one forward pass (and loss) to measure the bytes autograd saves."""
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.param_ptrs and ptr not in seen:
                seen[ptr] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.activation_peak = max(self.activation_peak, sum(seen.values()))

    def after_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Record gradient and optimizer-state bytes (call after ``step``, before zero_grad)."""
        self.grad_bytes = max(
            self.grad_bytes,
            sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None),
        )
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )
        self.optimizer_bytes = max(self.optimizer_bytes, state)

    def summary(self) -> dict:
        """Peak memory in MiB, how it was measured, and its parts."""
        mib = 1024 * 1024
        param_bytes = sum(p.numel() * p.element_size() for p in self.params)
        parts = {
            "parameters_mb": param_bytes / mib,
            "gradients_mb": self.grad_bytes / mib,
            "optimizer_state_mb": self.optimizer_bytes / mib,
            "activations_mb": self.activation_peak / mib,
        }
        out = {
            "peak_memory_mb": sum(parts.values()),
            "peak_memory_method": "tensor accounting: params + grads + AdamW state + "
            "autograd-saved activations",
            "memory_breakdown_mb": parts,
            "max_rss_mb": max_rss_mb(),
            "max_rss_growth_mb": max_rss_mb() - self.rss_start,
        }
        if self.device.type == "cuda":
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / mib
            out["peak_memory_method"] = "torch.cuda.max_memory_allocated"
        return out
