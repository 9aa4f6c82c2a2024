"""The builders every LoRA-shaped format shares: stored factors → :class:`~deltaspec.delta.Delta`.

- :func:`lora_factors`: ``lora_A`` (r, in[, k…]) and ``lora_B`` (out, r[, 1…]) checked against
  each other, the rank read from the shapes (0 refused, as PEFT refuses r ≤ 0), the scale s of
  that rank folded into B: ΔW = (B·s)·A, kept factored. PEFT LoRA (linear, conv, embedding via
  :func:`transposed`), MoE experts and the MTL-LoRA code base's LoRA layers read through it.
- :func:`dora`: DoRA's merge W′ = m ⊙ V/‖V‖ with V = W0 + B·A·s (or V = W0 for a magnitude-only
  layer), ΔW = W′ − W0, dense, in float64; the norm runs over ``axis`` (1: per output row, PEFT's
  linear/conv layers and DoRALinear; 0: per embedding dimension).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError
from deltaspec.loaders.store import TensorStore

Thunk = Callable[[], _delta.Factors]
Tensor = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class Factors:
    """An update's shape (out, in), its rank r, its scale s and the (B·s, A) thunk."""

    shape: tuple[int, int]
    rank: int
    scale: float
    load: Thunk


def lora_factors(store: TensorStore, source: str, name: str, a_key: str, b_key: str,
                 scale_of: Callable[[int], float]) -> Factors:
    """The checked factors of one LoRA module (``scale_of(r)`` gives s); nothing is read yet."""
    a_shape, b_shape = store.shape(a_key), store.shape(b_key)
    if len(a_shape) < 2 or len(b_shape) < 2 or b_shape[1] != a_shape[0] \
            or math.prod(b_shape[2:]) != 1:
        raise CheckpointError(f"{source}: {name}: tensor {b_key!r} has shape {b_shape}, which does "
                              f"not match {a_key!r} of shape {a_shape} ((out, r) and (r, in))")
    r = a_shape[0]
    if r <= 0:
        raise CheckpointError(f"{source}: tensor {a_key!r} has rank {r} (an r = 0 adapter; PEFT "
                              "refuses r ≤ 0)")
    shape = (b_shape[0], math.prod(a_shape[1:]))  # conv kernels flatten to (out, in·k…)
    s = scale_of(r)

    def load() -> _delta.Factors:
        b = store.get(b_key).to(torch.float32).reshape(shape[0], r)
        a = store.get(a_key).to(torch.float32).reshape(r, shape[1])
        return b * s, a

    return Factors(shape, r, s, load)


def transposed(f: Factors) -> Factors:
    """The factors of ΔWᵀ = Aᵀ·(B·s)ᵀ (embedding LoRA stores (B·A)ᵀ's factors)."""
    def load() -> _delta.Factors:
        b, a = f.load()
        return a.T, b.T

    return Factors((f.shape[1], f.shape[0]), f.rank, f.scale, load)


def factored(name: str, f: Factors, *, method: str, source: str, base: Tensor | None,
             bias: Tensor | None = None) -> Delta:
    """The factored Delta of ``f``."""
    return _delta.factored(name, f.shape, f.load, method=method, source=source, rank=f.rank,
                           base=base, bias=bias)


def dora(name: str, shape: tuple[int, int], factors: Thunk | None, base: Tensor,
         magnitude: Tensor, *, axis: int, source: str, bias: Tensor | None = None) -> Delta:
    """DoRA's dense ΔW = m ⊙ V/‖V‖_axis − W0, V = W0 + B·A (``factors`` None: V = W0)."""
    def load() -> torch.Tensor:
        w0 = base().to(torch.float64)
        w = w0
        if factors is not None:
            b, a = factors()
            w = w0 + b.to(torch.float64) @ a.to(torch.float64)
        norm = w.norm(p=2, dim=axis, keepdim=True)
        m = magnitude().to(torch.float64).reshape(norm.shape)
        return (m / norm * w - w0).to(torch.float32)

    return _delta.dense(name, shape, load, method="dora", source=source, base=base, bias=bias)


__all__ = ["Factors", "dora", "factored", "lora_factors", "transposed"]
