"""The solve route of a module, decided in one place from what its shapes say (torch-free, so the
plan decides it from safetensors headers and the engine from a :class:`~deltaspec.delta.Delta`
alike).

>>> choose(factored=True, inner_rank=4, shape=(32, 48))
'factored'
>>> choose(factored=True, inner_rank=32, shape=(32, 48))  # full rank: the Gram route is cheaper
'dense'
"""

from __future__ import annotations

FACTORED, DENSE, KRONECKER = "factored", "dense", "kronecker"


def choose(*, factored: bool, inner_rank: int, shape: tuple[int, int],
           kronecker: bool = False) -> str:
    """"kronecker", "factored" (a product of factors of inner rank below min(m, n)) or "dense"
    (Gram / SVD; zero matrices are found there)."""
    if kronecker:
        return KRONECKER
    return FACTORED if factored and inner_rank < min(shape) else DENSE


__all__ = ["DENSE", "FACTORED", "KRONECKER", "choose"]
