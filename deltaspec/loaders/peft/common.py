"""What every PEFT adapter format shares: finding the adapter folder, its ``peft_type``, its
weights, and the per-adapter context (:class:`Ctx`) the module builders take.

A PEFT adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or
``.bin``), possibly one sub-folder down (a named adapter saved by ``save_pretrained``). Which
format module reads it is decided by the config's ``peft_type`` alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaspec.errors import CheckpointError, UnsupportedError, UsageError
from deltaspec.loaders.checkpoint import Checkpoint, needs_transpose
from deltaspec.loaders.contract import Skipped
from deltaspec.loaders.peft.config import CONFIG, WEIGHTS, find_adapter_dir
from deltaspec.loaders.store import TensorStore, read_json
from deltaspec.names import strip_peft_prefix


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
    context = getattr(path, "context", None)
    if callable(context):  # an adapter in memory (deltaspec.loaders.sources.live.MemoryAdapter)
        return context(base, skipped)
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


_FULL = re.compile(r"^(?P<mod>.+?)(?P<base>\.base_layer)?\.(?P<leaf>weight|bias)$")


@dataclass
class Grouped:
    """An adapter's keys by role: each adapted module's parts, saved base layers, full weights."""

    modules: dict[str, dict[str, str]] = field(default_factory=dict)  # module → part → key
    base_layer: dict[str, dict[str, str]] = field(default_factory=dict)  # module → leaf → key
    full: dict[str, dict[str, str]] = field(default_factory=dict)  # modules_to_save
    shared: dict[str, str] = field(default_factory=dict)  # part → key of a model-level tensor
    other: list[str] = field(default_factory=list)


def group(ctx: Ctx, parts: tuple[str, ...], shared: tuple[str, ...] = ()) -> Grouped:
    """Sort the adapter's keys: ``<module>.<part>[.<adapter>][.weight]`` for each name in ``parts``,
    model-level ``base_model.<name>`` tensors for each in ``shared``, base layers and full weights."""
    alt = "|".join(sorted(parts, key=len, reverse=True))
    part_re = re.compile(rf"^(?P<mod>.+?)\.(?P<part>{alt})(?:\.(?!weight$)[^.]+)?(?:\.weight)?$")
    g = Grouped()
    for key in ctx.store:
        name = strip_peft_prefix(key)
        head = key.removeprefix("base_model.").split(".")[0]
        if head in shared and key.count(".") <= 2:
            g.shared[head] = key
        elif m := part_re.match(name):
            g.modules.setdefault(m["mod"], {})[m["part"]] = key
        elif m := _FULL.match(name):
            target = g.base_layer if m["base"] else g.full
            target.setdefault(m["mod"], {})[m["leaf"]] = key
        else:
            g.other.append(key)
    ctx.base_layers = g.base_layer
    return g


def require_base(ctx: Ctx, what: str) -> Checkpoint:
    """The base checkpoint, or a one-line error saying why ``what`` needs it."""
    if ctx.base is None:
        raise UsageError(f"{ctx.source}: {what}, so pass --base")
    return ctx.base


def check_options(ctx: Ctx, unsupported: dict[str, Callable[[Any], bool]]) -> None:
    """An :class:`UnsupportedError` naming the config and the option for the first option whose
    value the predicate flags (deltaspec would not report this adapter's exact ΔW)."""
    for option, bad in unsupported.items():
        if option in ctx.config and bad(ctx.config[option]):
            raise UnsupportedError(f"{ctx.config_path}: {option}={ctx.config[option]!r} is not "
                                   f"supported for peft_type {ctx.config.get('peft_type')!r}")


def truthy(value: Any) -> bool:
    """An option that is set (not None/False/0/empty)."""
    return bool(value)
