"""The base-checkpoint reader: an HF-style model folder (``config.json`` + weights), read lazily.

:class:`Checkpoint` finds a module's stored weight whatever the prefix drift (``model.``,
``transformer.``, …), resolves a tied output head, and orients a weight to an update's (out, in)
shape (GPT-2-style ``Conv1D`` weights are stored (in, out)). Every loader that needs a base gets
one of these (or None) from :func:`deltaspec.loaders.load`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltaspec.errors import CheckpointError, ShapeError
from deltaspec.loaders.sources.discovery import MODEL_WEIGHTS, holds_model_weights
from deltaspec.loaders.store import TensorStore, exists, open_weights, read_json
from deltaspec.names import guess_model_type, has_conv1d, is_conv1d, match_key

WEIGHT_STEMS = ("model", "pytorch_model")
TIED_HEAD = "lm_head.weight"
EMBED_KEYS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")
WEIGHT_FILES = MODEL_WEIGHTS  # declared with the torch-free check (sources/discovery.py)


class Checkpoint:
    """An HF-style model folder: ``config.json`` (optional) and its weights, read lazily."""

    def __init__(self, folder: Path) -> None:
        store = open_weights(folder, WEIGHT_STEMS)
        if store is None:
            raise CheckpointError(f"{folder}: no model weights (model.safetensors, sharded "
                                  "index or pytorch_model.bin) in this folder")
        cfg = folder / "config.json"
        self._setup(folder, store, read_json(cfg) if cfg.is_file() else {})

    @classmethod
    def of(cls, store: TensorStore, config: dict[str, Any], folder: Path) -> Checkpoint:
        """A checkpoint over tensors already opened (a model in memory: ``folder`` names it)."""
        ck = cls.__new__(cls)
        ck._setup(folder, store, config)
        return ck

    def _setup(self, folder: Path, store: TensorStore, config: dict[str, Any]) -> None:
        self.folder = folder
        self.store: TensorStore = store
        self.config: dict[str, Any] = config
        model_type = self.config.get("model_type")
        self.model_type: str | None = model_type if isinstance(model_type, str) else None
        self.model_type = self.model_type or guess_model_type(store.keys())
        self._by_match = {match_key(k): k for k in store}

    @property
    def tied(self) -> bool:
        """Whether the output head shares the input embedding (HF's default when unsaid)."""
        return bool(self.config.get("tie_word_embeddings", True))

    def embedding_key(self) -> str | None:
        """The stored key of the input embedding, if any."""
        return next((self._by_match[e] for e in EMBED_KEYS if e in self._by_match), None)

    def find(self, name: str) -> str | None:
        """The stored key of tensor ``name`` (any prefix drift), or the tied embedding for lm_head."""
        key = self._by_match.get(match_key(name))
        if key is None and match_key(name) == TIED_HEAD and self.tied:
            key = self.embedding_key()
        return key

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor as float32 (read now)."""
        return self.store.get(key).to(torch.float32)

    def oriented(self, name: str, shape: tuple[int, int],
                 fan_in_fan_out: bool | None = None) -> Callable[[], torch.Tensor]:
        """A thunk giving the base weight of module ``name`` as an (out, in) = ``shape`` tensor.

        The orientation comes from the stored tensor's shape; a square weight is transposed when
        it is a Conv1D module of this model type (or, for an architecture deltaspec does not know,
        when the adapter says ``fan_in_fan_out``). Conv kernels are flattened to (out, in·k…).
        """
        key = self.find(name + ".weight") or self.find(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: base has no weight for module {name!r}")
        conv = is_conv1d(self.model_type, name) if has_conv1d(self.model_type) else fan_in_fan_out
        transpose = needs_transpose(self.store.shape(key), shape, bool(conv),
                                    f"{self.store.file_of(key)}: tensor {key!r}")

        def load() -> torch.Tensor:
            w = self.tensor(key)
            return (w.T if transpose else w).reshape(shape)

        return load


    def canonical_shape(self, name: str, fan_in_fan_out: bool | None = None) -> tuple[int, int]:
        """The (out, in·k…) shape of module ``name``'s weight (Conv1D weights are stored (in, out))."""
        key = self.find(name + ".weight") or self.find(name)
        if key is None:
            raise CheckpointError(f"{self.folder}: base has no weight for module {name!r}")
        stored = self.store.shape(key)
        if len(stored) < 2:
            raise CheckpointError(f"{self.store.file_of(key)}: tensor {key!r} of shape {stored} is "
                                  "not a weight matrix")
        conv = is_conv1d(self.model_type, name) if has_conv1d(self.model_type) else fan_in_fan_out
        if len(stored) == 2 and conv:
            return stored[1], stored[0]
        return stored[0], math.prod(stored[1:])


def needs_transpose(stored: tuple[int, ...], shape: tuple[int, int], conv: bool, what: str) -> bool:
    """Whether a stored weight must be transposed to be (out, in) = ``shape``.

    Decided by the shapes; only a square weight falls back on ``conv`` (stored (in, out)).
    """
    stored = tuple(stored)
    if len(stored) != 2:
        flat = (stored[0], math.prod(stored[1:])) if len(stored) > 2 else stored
        if flat == tuple(shape):
            return False
    else:
        fits, flipped = stored == tuple(shape), stored == (shape[1], shape[0])
        if fits and flipped:
            return conv
        if fits or flipped:
            return flipped
    raise ShapeError(f"{what}: base shape {stored} does not fit an update of shape {tuple(shape)}")


def open_weights_exists(folder: Path) -> bool:
    """True when ``folder`` holds HF model weights (single, sharded or pickled)."""
    return holds_model_weights(folder)


def base_for(base: Path | None) -> Checkpoint | None:
    """Open a base checkpoint folder (or None)."""
    if base is None:
        return None
    if not exists(base):
        raise CheckpointError(f"{base}: no such file or directory")
    return Checkpoint(base.parent if base.is_file() else base)
