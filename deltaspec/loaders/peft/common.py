"""What every PEFT adapter format shares: finding the adapter folder, its ``peft_type``, its
weights, and the opened adapter (:class:`Adapter`) the module builders take.

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

from deltaspec.errors import CheckpointError, UnsupportedError, UsageError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint, needs_transpose
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import keys
from deltaspec.loaders.peft.config import CONFIG, WEIGHTS, find_adapter_dir
from deltaspec.loaders.store import TensorStore, read_json


def adapter_config(source: Source) -> dict[str, Any] | None:
    """The adapter config of ``source``: a folder's ``adapter_config.json`` (or its one adapter
    sub-folder's), an adapter in memory's config; None for anything else."""
    if isinstance(source, Path):
        folder = find_adapter_dir(source)
        return None if folder is None else read_json(folder / CONFIG)
    context, config = getattr(source, "context", None), getattr(source, "config", None)
    return config if callable(context) and isinstance(config, dict) else None


def peft_type(source: Source) -> str | None:
    """The upper-cased ``peft_type`` of the adapter ``source`` (None: not a PEFT adapter)."""
    config = adapter_config(source)
    return None if config is None else str(config.get("peft_type")).upper()


def detector(*types: str) -> Callable[[Source], bool]:
    """A ``detect(source)`` claiming the PEFT adapters (folders or in memory) whose peft_type is
    one of ``types``."""
    def detect(folder: Source) -> bool:
        return peft_type(folder) in types

    detect.__doc__ = f"True for a PEFT adapter with peft_type {' or '.join(types)}."
    return detect


@dataclass
class Adapter:
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


def open_adapter(path: Source, base: Checkpoint | None, skipped: Skipped,
                 config_schema: schema.Schema | None = None) -> Adapter:
    """The adapter at ``path`` (its config read and checked against the format's
    ``config_schema`` before anything else, its weights opened lazily) as an :class:`Adapter`."""
    ctx = _open(path, base, skipped)
    if config_schema is not None:
        schema.check(ctx.config, config_schema, ctx.config_path)
    return ctx


def _open(path: Source, base: Checkpoint | None, skipped: Skipped) -> Adapter:
    if not isinstance(path, Path):  # an adapter in memory (sources.live.MemoryAdapter)
        opened = None if isinstance(path, Checkpoint) else path.context(base, skipped)
        if not isinstance(opened, Adapter):
            raise UsageError(f"{path}: not an adapter")
        return opened
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
    return Adapter(store, config, base, str(weights), folder / CONFIG, skipped)


def group(ctx: Adapter, parts: tuple[str, ...], shared: tuple[str, ...] = ()) -> keys.Groups:
    """The adapter's keys by role (:func:`deltaspec.loaders.peft.keys.group`, the one grouper),
    its saved base layers remembered in ``ctx``."""
    g = keys.group(ctx.store.keys(), parts, shared)
    ctx.base_layers = g.base_layer
    return g


def require_base(ctx: Adapter, what: str) -> Checkpoint:
    """The base checkpoint, or a one-line error saying why ``what`` needs it."""
    if ctx.base is None:
        raise UsageError(f"{ctx.source}: {what}, so pass --base")
    return ctx.base


def check_options(ctx: Adapter, unsupported: dict[str, Callable[[Any], bool]]) -> None:
    """An :class:`UnsupportedError` naming the config and the option for the first option whose
    value the predicate flags (deltaspec would not report this adapter's exact ΔW)."""
    for option, bad in unsupported.items():
        if option in ctx.config and bad(ctx.config[option]):
            raise UnsupportedError(f"{ctx.config_path}: {option}={ctx.config[option]!r} is not "
                                   f"supported for peft_type {ctx.config.get('peft_type')!r}")


def truthy(value: Any) -> bool:
    """An option that is set (not None/False/0/empty)."""
    return bool(value)
