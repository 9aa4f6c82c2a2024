"""Lazy tensor access to checkpoint files: single or sharded safetensors, or pickled ``.bin``.

A :class:`TensorStore` maps tensor names to the file that holds them and reads one tensor at a
time (``safetensors.safe_open`` memory-maps the file; ``.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)``). Every failure is a :class:`CheckpointError` naming
the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltaspec.delta import check_finite
from deltaspec.errors import CheckpointError, ConfigError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class TensorStore:
    """Name → tensor, read lazily from one or more files of one checkpoint."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._where = files  # tensor name -> file
        self._handles: dict[Path, Any] = {}

    @classmethod
    def from_files(cls, paths: list[Path]) -> TensorStore:
        """A store over whole files (every tensor of each file)."""
        where: dict[str, Path] = {}
        store = cls(where)
        for path in paths:
            for key in store._open(path).keys():  # noqa: SIM118 (safe_open has no __iter__)
                where[key] = path
        return store

    @classmethod
    def from_index(cls, index: Path) -> TensorStore:
        """A store over a sharded checkpoint described by ``*.index.json`` (its ``weight_map``)."""
        # Containment on names as written: hub caches link every shard to ../../blobs/<sha>.
        folder = Path(os.path.normpath(index.parent.absolute()))
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid index file ({_why(exc)})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' is not a mapping")
        where: dict[str, Path] = {}
        for key, shard in weight_map.items():
            path = Path(os.path.normpath(folder / str(shard)))
            if not path.is_relative_to(folder):
                raise CheckpointError(f"{index}: weight_map entry {key!r} points outside the folder")
            if not path.is_file():
                raise CheckpointError(f"{index}: shard {shard!r} of tensor {key!r} is missing")
            where[key] = path
        store = cls(where)
        for path in sorted(set(where.values())):
            keys = set(store._open(path).keys())
            missing = [k for k, p in where.items() if p == path and k not in keys]
            if missing:
                raise CheckpointError(f"{path}: tensor {missing[0]!r} listed in {index.name} is absent")
        return store

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._where)

    def __iter__(self):  # noqa: ANN204
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        """The file that holds ``key``."""
        return self._where[key]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading its data."""
        handle = self._open(self._where[key])
        if isinstance(handle, dict):
            return tuple(handle[key].shape)
        return tuple(handle.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (as stored: dtype unchanged); NaN/Inf is a NumericalError naming it."""
        path = self._where[key]
        handle = self._open(path)
        try:
            t = handle[key] if isinstance(handle, dict) else handle.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({_why(exc)})") from None
        return check_finite(t, f"{path}: tensor {key!r}")

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = _open_file(path)
        return self._handles[path]


def _open_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: not a valid safetensors file ({_why(exc)})") from None
    return _load_pickle(path)


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or unsafe pickle
        raise CheckpointError(f"{path}: cannot be read as a weights-only torch file ({_why(exc)})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return obj


def _why(exc: BaseException) -> str:
    """The first line of an exception's message, trimmed: errors stay one line."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def open_weights(folder: Path, stems: tuple[str, ...]) -> TensorStore | None:
    """The weights of an HF-style folder: ``<stem>.safetensors``, a sharded index, or ``.bin``.

    ``stems`` are tried in order (e.g. ``("model", "pytorch_model")``); None when nothing is there.
    """
    for name in INDEX_NAMES:
        if (folder / name).is_file():
            return TensorStore.from_index(folder / name)
    for stem in stems:
        for suffix in (".safetensors", ".bin"):
            if (folder / f"{stem}{suffix}").is_file():
                return TensorStore.from_files([folder / f"{stem}{suffix}"])
    shards = sorted(folder.glob("model-*-of-*.safetensors")) or sorted(
        folder.glob("pytorch_model-*-of-*.bin")
    )
    return TensorStore.from_files(shards) if shards else None


def parse_json_file(path: Path, what: str = "valid JSON", hint: str = "") -> Any:
    """Parse a JSON file, or raise a one-line error naming it (``what``: the kind of file the
    error says it is not; ``hint``: how to get a good one)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file{hint}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not {what} ({_why(exc)}){hint}") from None


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, or raise a one-line error naming it."""
    data = parse_json_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data
