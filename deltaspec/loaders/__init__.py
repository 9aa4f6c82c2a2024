"""Checkpoint → ``dict[str, Delta]``: every format one module of this package, chosen through one
table (:data:`~deltaspec.loaders.registry.FORMATS`; how to add a format is told there).

The table and :func:`load` / :func:`detect_format` live in :mod:`deltaspec.loaders.registry` and
are imported on first use: the modules that need no tensors (adapter configs
:mod:`~deltaspec.loaders.peft_config`, LoRA key names :mod:`~deltaspec.loaders.lora_keys`, the Hub
:mod:`~deltaspec.loaders.sources`, base discovery :mod:`~deltaspec.loaders.discovery`) import
without torch, which the torch-free plan (:mod:`deltaspec.plan`) and numpy executor rely on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deltaspec.loaders.registry import (
        FORMATS,
        Checkpoint,
        Deltas,
        detect_format,
        load,
        resolve,
        supported_peft_types,
    )

_REGISTRY = ("FORMATS", "Checkpoint", "Deltas", "detect_format", "load", "resolve",
             "supported_peft_types")


def __getattr__(name: str) -> Any:
    if name not in _REGISTRY:
        raise AttributeError(f"module 'deltaspec.loaders' has no attribute {name!r}")
    return getattr(importlib.import_module("deltaspec.loaders.registry"), name)


__all__ = ["FORMATS", "Checkpoint", "Deltas", "detect_format", "load", "resolve",
           "supported_peft_types"]
