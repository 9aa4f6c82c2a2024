"""Lazy tensor access to checkpoint files: single or sharded safetensors, or pickled ``.bin``.

A :class:`TensorStore` maps tensor names to the file that holds them and reads one tensor at a
time (``safetensors.safe_open`` memory-maps the file; ``.bin`` files are opened with
``torch.load(weights_only=True, mmap=True)``). Every failure is a :class:`CheckpointError` naming
the file and what is wrong.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from deltaspec.config_files import parse_json_file, why
from deltaspec.delta import check_finite, weights_dtype
from deltaspec.errors import CheckpointError
from deltaspec.names import MAX_NAME

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
                where[_tensor_name(key, path)] = path
        return store

    @classmethod
    def from_index(cls, index: Path) -> TensorStore:
        """A store over a sharded checkpoint described by ``*.index.json`` (its ``weight_map``)."""
        weight_map = parse_json_file(index, "a valid index file").get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: 'weight_map' is not a mapping")
        where: dict[str, Path] = {}
        for key, shard in weight_map.items():
            key = _tensor_name(key, index)
            where[key] = member_path(index.parent, shard, f"{index}: weight_map entry {key!r}")
            if not where[key].is_file():
                raise CheckpointError(f"{index}: shard {shard!r} of tensor {key!r} is missing")
        for path in set(where.values()):
            contained(index.parent, path, f"{index}: shard {path.name!r}")
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

    def holds_weights(self, key: str) -> bool:
        """Whether ``key`` is stored as floating point (not an integer/bool buffer such as
        ``position_ids`` or a quantised ``qweight``), read from the header only."""
        handle = self._open(self._where[key])
        if isinstance(handle, dict):
            t = handle[key]
            return t.is_floating_point() or t.is_complex()
        return handle.get_slice(key).get_dtype().startswith(("F", "BF", "C"))

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (as stored: dtype unchanged); NaN/Inf is a NumericalError naming it."""
        path = self._where[key]
        handle = self._open(path)
        try:
            t = handle[key] if isinstance(handle, dict) else handle.get_tensor(key)
        except (SafetensorError, RuntimeError, ValueError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({_why(exc)})") from None
        what = f"{path}: tensor {key!r}"
        return check_finite(weights_dtype(t, what), what)

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


class _Stub:
    """Stands for any class or object while a legacy pickle is dry-run (nothing is imported)."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __call__(self, *args: Any, **kw: Any) -> _Stub:
        return _Stub()

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _SizeScan(pickle.Unpickler):
    """Dry-runs a legacy torch pickle, summing the bytes its storages declare."""

    declared = 0

    def find_class(self, module: str, name: str) -> Any:
        return _Stub(name)

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind = getattr(pid[1], "name", "")
            size = _ELEMENT_SIZE.get(kind.removesuffix("Storage"), 8)
            numel = pid[4] if isinstance(pid[4], int) else 0
            self.declared += max(numel, 0) * size
        return _Stub()


_ELEMENT_SIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4,
                 "Short": 2, "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8,
                 "ComplexDouble": 16, "Untyped": 1}


def _check_legacy_sizes(path: Path) -> None:
    """A legacy (non-zip) torch file allocates every storage it declares before reading it: refuse
    declarations larger than the file, before torch allocates them."""
    if zipfile.is_zipfile(path):
        return  # the zip format checks each record's size against the archive (and mmaps it)
    try:
        with open(path, "rb") as fh:
            for _ in range(3):  # magic number, protocol version, sys info (stubs: nothing runs)
                _SizeScan(fh).load()
            scan = _SizeScan(fh)
            scan.load()
    except Exception:
        return  # not a legacy torch file: torch.load names the problem
    if scan.declared > path.stat().st_size:
        raise CheckpointError(f"{path}: declares {scan.declared} bytes of tensors but the file "
                              f"holds {path.stat().st_size}: corrupt or hostile")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    _check_legacy_sizes(path)
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


_why = why


def _tensor_name(key: object, where: Path) -> str:
    """A tensor name as read from a file: a string of at most ``MAX_NAME`` characters (real
    names are < 200; a longer one only makes every name match cost more)."""
    if not isinstance(key, str) or len(key) > MAX_NAME:
        shown = key[:60] + "…" if isinstance(key, str) else repr(key)[:60]
        raise CheckpointError(f"{where}: tensor name {shown!r} is not a name of at most "
                              f"{MAX_NAME} characters")
    return key


def exists(path: Path) -> bool:
    """``path.exists()``, with a path the system cannot even look up (too long, a NUL byte) a
    one-line CheckpointError naming it instead of an OSError/ValueError."""
    try:
        return path.exists()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be looked up ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a valid path ({why(exc)})") from None


def member_path(folder: Path, name: object, what: str) -> Path:
    """``folder / name`` for a file name read from a file (an index's shard name, …), checked on
    the name as written: relative, no ``..``, no NUL, at most ``MAX_NAME`` characters and 255
    bytes a component. Where a symlink points is not looked at, so a Hugging Face cache
    (``snapshots/<rev>/x`` → ``../../blobs/<sha>``) reads like any folder."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{what}: the file name must be a non-empty string, not {name!r:.80}")
    bad = ("holds a NUL byte" if "\0" in name else
           f"is {len(name)} characters long" if len(name) > MAX_NAME else
           "is an absolute path" if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute()
           or (len(name) > 1 and name[1] == ":") else
           "points outside the folder (..)" if ".." in name.replace("\\", "/").split("/") else
           "has a path component over 255 bytes"
           if any(len(c.encode("utf-8", "surrogatepass")) > 255 for c in name.split("/")) else "")
    if bad:
        raise CheckpointError(f"{what}: file name {name[:80]!r} {bad}")
    return folder / name


def contained(folder: Path, path: Path, what: str) -> None:
    """A one-line CheckpointError unless ``path`` (a file an index names) resolves inside
    ``folder`` — or, for a Hugging Face cache snapshot (``…/snapshots/<commit>/``), inside that
    repo's ``blobs/``, where the cache's own symlinks point."""
    real, root = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if real.is_relative_to(root):
        return
    parts = Path(os.path.abspath(folder)).parts
    if "snapshots" in parts:
        repo = Path(*parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        if real.is_relative_to(Path(os.path.realpath(repo / "blobs"))):
            return
    raise CheckpointError(f"{what} resolves outside {folder} (to {real}); refusing to read it")


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


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object file, or raise a one-line error naming it."""
    return parse_json_file(path)
