"""What every PEFT adapter format shares: finding the adapter folder, its ``peft_type``, its
weights, and the per-adapter context (:class:`Ctx`) the module builders take.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``), possibly one sub-folder down (a named adapter saved by ``save_pretrained``). Which
format module reads it is decided by the config's ``peft_type`` alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaspec.errors import CheckpointError, UsageError
from deltaspec.loaders.checkpoint import Checkpoint, needs_transpose
from deltaspec.loaders.contract import Skipped
from deltaspec.loaders.store import TensorStore, read_json

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def find_adapter_dir(path: Path) -> Path | None:
    """``path`` itself, or its one sub-folder named after an adapter, that holds the config."""
    if (path / CONFIG).is_file():
        return path
    if not path.is_dir():
        return None
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
    if len(subs) > 1:
        names = ", ".join(p.name for p in subs)
        raise UsageError(f"{path}: holds several adapters ({names}); pass one of those folders")
    return subs[0] if subs else None


def peft_type(path: Path) -> str | None:
    """The upper-cased ``peft_type`` of the adapter at ``path`` (None: not a PEFT adapter)."""
    folder = find_adapter_dir(path)
    if folder is None:
        return None
    return str(read_json(folder / CONFIG).get("peft_type")).upper()


def detector(*types: str) -> Callable[[Path], bool]:
    """A ``detect(folder)`` claiming the PEFT adapters whose peft_type is one of ``types``."""
    def detect(folder: Path) -> bool:
        return peft_type(folder) in types

    detect.__doc__ = f"True for a PEFT adapter with peft_type {' or '.join(types)}."
    return detect


@dataclass
class Ctx:
    """What every builder needs: the store, config, the optional base and the skip list."""

    store: TensorStore
    config: dict[str, Any]
    base: Checkpoint | None
    source: str
    config_path: Path
    skipped: Skipped
    base_layers: dict[str, dict[str, str]] = field(default_factory=dict)

    def get(self, key: str) -> torch.Tensor:
        """One adapter tensor as float32."""
        return self.store.get(key).to(torch.float32)

    def get64(self, key: str) -> torch.Tensor:
        """One adapter tensor as float64."""
        return self.store.get(key).to(torch.float64)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key`` (nothing is read)."""
        return self.store.shape(key)

    def base_weight(self, name: str, shape: tuple[int, int],
                    fan_in_fan_out: bool | None) -> Callable[[], torch.Tensor] | None:
        """The base weight of module ``name`` as (out, in) = ``shape``: from ``--base``, else from
        the adapter's own ``base_layer.weight`` (saved with embedding LoRA), else None."""
        if self.base is not None:
            return self.base.oriented(name, shape, fan_in_fan_out)
        key = self.base_layers.get(name, {}).get("weight")
        if key is None:
            return None
        transpose = needs_transpose(self.store.shape(key), shape, bool(fan_in_fan_out),
                                    f"{self.source}: tensor {key!r}")
        return lambda: (self.get(key).T if transpose else self.get(key)).reshape(shape)


def open_adapter(path: Path, base: Checkpoint | None,
                 skipped: Skipped) -> Ctx:
    """The adapter at ``path`` (its config read, its weights opened lazily) as a :class:`Ctx`."""
    folder = find_adapter_dir(path)
    if folder is None:
        raise CheckpointError(f"{path}: no {CONFIG} here")
    config = read_json(folder / CONFIG)
    weights = next((folder / w for w in WEIGHTS if (folder / w).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no adapter_model.safetensors or adapter_model.bin "
                              f"next to {CONFIG}")
    store = TensorStore.from_files([weights])
    if len(store) == 0:
        raise CheckpointError(f"{weights}: the adapter holds no tensors")
    return Ctx(store, config, base, str(weights), folder / CONFIG, skipped)
