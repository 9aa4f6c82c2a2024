"""Lazy exports for a package's ``__init__``: its public names are imported from their modules on
first use, so that importing the package costs nothing (no torch, pandas or framework).

>>> getattr_ = exports("deltaspec.example", {"dumps": "json"})
>>> getattr_("dumps").__name__
'dumps'
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def exports(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: name → the module (in ``table``) defining it."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__


__all__ = ["exports"]
