"""deltaspec: exact spectral analysis of fine-tuning weight updates (ΔW).

>>> import deltaspec
>>> sorted(deltaspec.__all__)[:3]
['Delta', 'DeltaspecError', 'Options']

The public names are imported on first use, so that ``import deltaspec.cli`` (and with it
``deltaspec --help``) does not pay for torch and pandas.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from deltaspec.errors import DeltaspecError

if TYPE_CHECKING:
    from deltaspec.act.run import compress, extract
    from deltaspec.act.verify import verify_merge
    from deltaspec.analyze import analyze, compare, spectra
    from deltaspec.collection import zoo
    from deltaspec.delta import Delta
    from deltaspec.engine.spectrum import Spectrum, spectrum
    from deltaspec.inline import plot_democracy
    from deltaspec.loaders import load
    from deltaspec.options import Options
    from deltaspec.trajectory import trajectory

_LAZY = {
    "Delta": "deltaspec.delta",
    "Options": "deltaspec.options",
    "Spectrum": "deltaspec.engine.spectrum",
    "analyze": "deltaspec.analyze",
    "compare": "deltaspec.analyze",
    "compress": "deltaspec.act.run",
    "extract": "deltaspec.act.run",
    "load": "deltaspec.loaders",
    "plot_democracy": "deltaspec.inline",
    "spectra": "deltaspec.analyze",
    "spectrum": "deltaspec.engine.spectrum",
    "trajectory": "deltaspec.trajectory",
    "verify_merge": "deltaspec.act.verify",
    "zoo": "deltaspec.collection",
}

__all__ = [
    "Delta",
    "DeltaspecError",
    "Options",
    "Spectrum",
    "analyze",
    "compare",
    "compress",
    "extract",
    "load",
    "plot_democracy",
    "spectra",
    "spectrum",
    "trajectory",
    "verify_merge",
    "zoo",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'deltaspec' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``deltaspec.analyze`` is the function even once the submodule of that name is imported
    (importing a submodule would otherwise rebind the package attribute to the module)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
