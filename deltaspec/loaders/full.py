"""Full fine-tunes: ΔW = W_finetuned − W_base, paired tensor by tensor, read one at a time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ShapeError
from deltaspec.loaders.store import TensorStore, open_weights, read_json
from deltaspec.names import is_conv1d, match_key

WEIGHT_STEMS = ("model", "pytorch_model")
TIED_HEAD = "lm_head.weight"
EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


class Checkpoint:
    """An HF-style model folder: ``config.json`` (optional) and its weights, read lazily."""

    def __init__(self, folder: Path) -> None:
        store = open_weights(folder, WEIGHT_STEMS)
        if store is None:
            raise CheckpointError(f"{folder}: no model weights (model.safetensors, sharded "
                                  "index or pytorch_model.bin) in this folder")
        self.folder = folder
        self.store: TensorStore = store
        cfg = folder / "config.json"
        self.config: dict[str, Any] = read_json(cfg) if cfg.is_file() else {}
        self.model_type: str | None = self.config.get("model_type")
        self._by_match = {match_key(k): k for k in store}

    @staticmethod
    def detect(folder: Path) -> bool:
        """True when the folder holds model weights an HF model would save."""
        return open_weights_exists(folder)

    def find(self, name: str) -> str | None:
        """The stored key of tensor ``name`` (any prefix drift), or the tied embedding for lm_head."""
        key = self._by_match.get(match_key(name))
        if key is None and match_key(name) == TIED_HEAD:
            key = next((self._by_match[e] for e in EMBED_KEYS if e in self._by_match), None)
        return key

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor as float32 (read now)."""
        return self.store.get(key).to(torch.float32)

    def oriented(self, name: str, shape: tuple[int, int], fan_in_fan_out: bool) -> Callable[[], torch.Tensor]:
        """A thunk giving the base weight of module ``name`` in (out, in) = ``shape`` orientation."""
        key = self.find(name + ".weight") or self.find(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: base has no weight for module {name!r}")
        stored = self.store.shape(key)
        transpose = _needs_transpose(stored, shape, fan_in_fan_out, f"{self.folder}: {key}")
        return lambda: self.tensor(key).T if transpose else self.tensor(key)


def _needs_transpose(stored: tuple[int, ...], shape: tuple[int, int], fan_in_fan_out: bool,
                     what: str) -> bool:
    if len(stored) != 2:
        stored_flat = (stored[0], int(torch.tensor(stored[1:]).prod())) if stored else ()
        if stored_flat == tuple(shape):
            return False
    if tuple(stored) == tuple(shape) and (shape[0] != shape[1] or not fan_in_fan_out):
        return False
    if tuple(stored) == (shape[1], shape[0]):
        return True
    raise ShapeError(f"{what}: base shape {tuple(stored)} does not fit an update of shape {shape}")


def open_weights_exists(folder: Path) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
             "pytorch_model.bin.index.json")
    return any((folder / n).is_file() for n in names) or any(folder.glob("model-*-of-*.safetensors")) \
        or any(folder.glob("pytorch_model-*-of-*.bin"))


def load_full(path: Path, base: Path | None, skipped: list[tuple[str, str]]) -> dict[str, Delta]:
    """Deltas of every 2-D weight that the fine-tuned checkpoint and its base share."""
    if base is None:
        raise CheckpointError(f"{path}: a full checkpoint needs its base (--base) to give an update")
    ft, bs = Checkpoint(path), Checkpoint(base)
    model_type = ft.model_type or bs.model_type
    out: dict[str, Delta] = {}
    for key in ft.store:
        shape = ft.store.shape(key)
        if len(shape) != 2:
            skipped.append((key, f"{len(shape)}-D tensor"))
            continue
        base_key = bs.find(key)
        if base_key is None:
            skipped.append((key, "not in the base checkpoint"))
            continue
        base_shape = bs.store.shape(base_key)
        if base_shape != shape:
            raise ShapeError(f"{path}: tensor {key!r} has shape {shape} but the base {base} has "
                             f"{base_shape}")
        name = key[: -len(".weight")] if key.endswith(".weight") else key
        conv = is_conv1d(model_type, name)
        out[name] = _full_delta(ft, bs, key, base_key, name, conv)
    return out


def _full_delta(ft: Checkpoint, bs: Checkpoint, key: str, base_key: str, name: str,
                conv: bool) -> Delta:
    rows, cols = ft.store.shape(key)
    shape = (cols, rows) if conv else (rows, cols)
    source = str(ft.store.file_of(key))

    def base_w() -> torch.Tensor:
        w = bs.tensor(base_key)
        return w.T if conv else w

    def load() -> torch.Tensor:
        d = ft.tensor(key) - bs.tensor(base_key)
        return d.T if conv else d

    return _delta.dense(name, shape, load, method="full", source=source, base=base_w)


def base_for(base: Path | None) -> Checkpoint | None:
    """Open a base checkpoint folder (or None)."""
    if base is None:
        return None
    if not base.exists():
        raise CheckpointError(f"{base}: no such file or directory")
    return Checkpoint(base)


def read_config(folder: Path) -> dict[str, Any]:
    """config.json of a model folder, or {} when it has none."""
    cfg = folder / "config.json"
    return read_json(cfg) if cfg.is_file() else {}
