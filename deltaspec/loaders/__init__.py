"""Checkpoint → ``dict[str, Delta]``: every format one module, the modules grouped by role, chosen
through one table (:data:`~deltaspec.loaders.registry.FORMATS`; how to add a format is told there).

Layout::

    sources/     where a checkpoint comes from: hub.py (Hub ids, the cache), live.py (PeftModel,
                 nn.Module, state dicts), discovery.py (the base an adapter names)
    peft/        one file per PEFT method (lora, adalora, vera, loha, lokr, ia3, oft, boft,
                 fourierft), their config rules (config.py), key grouper (keys.py), shared
                 pieces (common.py, extras.py)
    multi/       several LoRA parts per module: multilora, mtl_lora (+ mtl_tasks), MoE
                 (mixlora, lora_moe, moe)
    full.py      full fine-tunes against their base
    build.py     the one LoRA factors → Delta builder and the one DoRA merge
    registry.py  FORMATS, load(), detect_format(): one dispatch for folders and live objects
    store.py, checkpoint.py, contract.py   tensors read lazily, the base checkpoint, the contract

The table and :func:`load` / :func:`detect_format` live in :mod:`deltaspec.loaders.registry` and
are imported on first use: the modules that need no tensors (adapter configs
:mod:`~deltaspec.loaders.peft.config`, LoRA key names :mod:`~deltaspec.loaders.peft.keys`, the Hub
:mod:`~deltaspec.loaders.sources.hub`, base discovery :mod:`~deltaspec.loaders.sources.discovery`)
import without torch, which the torch-free plan (:mod:`deltaspec.plan`) and numpy executor rely on.
The modules' former flat names (``deltaspec.loaders.peft_config`` …) still resolve as attributes
of this package (``from deltaspec.loaders import peft_config``).
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
# The flat names of the modules before they were grouped by role → where they live now.
MOVED = {"discovery": "sources.discovery", "live": "sources.live", "peft_common": "peft.common",
         "peft_config": "peft.config", "lora_keys": "peft.keys", "peft_extras": "peft.extras",
         "peft_lora": "peft.lora", "moe": "multi.moe", "mtl_tasks": "multi.mtl_tasks",
         **{m: f"peft.{m}" for m in ("adalora", "boft", "fourierft", "ia3", "loha", "lokr", "oft",
                                      "vera")},
         **{m: f"multi.{m}" for m in ("multilora", "mtl_lora", "mixlora", "lora_moe")}}


def __getattr__(name: str) -> Any:
    if name in MOVED:
        return importlib.import_module(f"deltaspec.loaders.{MOVED[name]}")
    if name not in _REGISTRY:
        raise AttributeError(f"module 'deltaspec.loaders' has no attribute {name!r}")
    return getattr(importlib.import_module("deltaspec.loaders.registry"), name)


__all__ = ["FORMATS", "Checkpoint", "Deltas", "detect_format", "load", "resolve",
           "supported_peft_types"]
