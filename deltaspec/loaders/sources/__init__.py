"""Where checkpoints come from: a folder or weights file, a Hugging Face Hub id
(:mod:`~deltaspec.loaders.sources.hub`), a live object — PeftModel, ``nn.Module``, state dict
(:mod:`~deltaspec.loaders.sources.live`) — and the base an adapter names
(:mod:`~deltaspec.loaders.sources.discovery`). Nothing here imports torch at import time except
:mod:`~deltaspec.loaders.sources.live`.
"""

from __future__ import annotations

import importlib
from typing import Any

_SUBMODULES = ("discovery", "hub", "live")


def __getattr__(name: str) -> Any:
    """The former flat module ``deltaspec.loaders.sources`` is today's :mod:`.hub`: its names
    (``sources.locate``, ``sources.hub_folder`` …) still resolve here, read from there."""
    if name.startswith("__") or name in _SUBMODULES:
        raise AttributeError(f"module 'deltaspec.loaders.sources' has no attribute {name!r}")
    hub = importlib.import_module("deltaspec.loaders.sources.hub")
    try:
        return getattr(hub, name)
    except AttributeError:
        raise AttributeError(f"module 'deltaspec.loaders.sources' has no attribute {name!r}") \
            from None
