"""Full fine-tunes: ΔW = W_finetuned − W_base, paired tensor by tensor, read one at a time.

Tensors pair by name after normalising known prefixes (``model.``, ``transformer.``, …), so a base
saved as a bare ``LlamaModel``/``GPT2Model`` pairs with a ``*ForCausalLM`` fine-tune. GPT-2-style
``Conv1D`` weights (stored (in, out)) are canonicalised to (out, in) through the model-type table
of :mod:`deltaspec.names`, so full and LoRA updates of the same model pair with equal shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ShapeError
from deltaspec.loaders.checkpoint import TIED_HEAD, Checkpoint, open_weights_exists
from deltaspec.loaders.contract import Noted, Skipped, Source, folder_of
from deltaspec.loaders.sources.discovery import same_model
from deltaspec.names import is_conv1d, match_key
from deltaspec.options import Options


def detect(folder: Source) -> bool:
    """True for a full model in memory, or a folder holding HF model weights (single, sharded or
    pickled)."""
    return isinstance(folder, Checkpoint) or (isinstance(folder, Path) and open_weights_exists(folder))


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Deltas of every 2-D weight that the fine-tuned checkpoint and its base share."""
    if base is None:
        raise CheckpointError(f"{getattr(folder, 'folder', folder)}: a full checkpoint needs its "
                              "base (--base) to give an update")
    ft = folder if isinstance(folder, Checkpoint) else Checkpoint(folder_of(folder, "full models"))
    bs = base
    model_type = ft.model_type or bs.model_type
    out: dict[str, Delta] = {}
    paired: set[str] = set()
    unpaired = 0
    for key in ft.store:
        shape = ft.store.shape(key)
        if len(shape) != 2:
            skipped.append((key, f"{len(shape)}-D tensor"))
            continue
        if 0 in shape:
            skipped.append((key, f"empty tensor of shape {shape}"))
            continue
        if not ft.store.holds_weights(key):
            skipped.append((key, "integer or bool tensor (a buffer or quantised data), not a weight"))
            continue
        base_key = bs.find(key)
        if base_key is None:
            skipped.append((key, "not in the base checkpoint"))
            unpaired += 1
            continue
        base_shape = bs.store.shape(base_key)
        if base_shape != shape:
            raise ShapeError(f"{ft.store.file_of(key)}: tensor {key!r} has shape {shape} but the "
                             f"base's {base_key!r} in {bs.store.file_of(base_key)} has {base_shape}")
        paired.add(base_key)
        name = key.removesuffix(".weight")
        out[name] = _full_delta(ft, bs, key, base_key, name, is_conv1d(model_type, name))
    if unpaired > len(out):  # most weights have no counterpart: another model, not this one's base
        raise CheckpointError(f"{bs.folder}: only {len(out)} of {len(out) + unpaired} weight "
                              f"matrices of {getattr(folder, 'folder', folder)} have a counterpart "
                              "in this base: is --base the model it was fine-tuned from?")
    _tied_head(ft, bs, out, paired, skipped)
    return Noted(out, _notes(ft, bs))


def _notes(ft: Checkpoint, bs: Checkpoint) -> list[str]:
    """Files of the fine-tune's folder that are not weights (ignored), and a base other than
    the one its config.json names (``_name_or_path``)."""
    notes = []
    if isinstance(ft.folder, Path) and ft.folder.is_dir():
        extra = sorted(p.name for p in ft.folder.glob("*.p[t]*") if p.suffix in (".pt", ".pth"))
        if extra:
            notes.append(f"{ft.folder}: ignored {len(extra)} file(s) that hold no model weights "
                         f"({', '.join(extra[:4])}{', …' if len(extra) > 4 else ''})")
    named = ft.config.get("_name_or_path")
    own = str(ft.folder) in (named, str(Path(str(named)).expanduser()))
    if isinstance(named, str) and named.strip() and not own and not str(bs.folder).startswith("<") \
            and not same_model(named, str(bs.folder), bs.folder):
        notes.append(f"{bs.folder} is not the base {ft.folder}/config.json names ({named!r}); "
                     "the shapes fit, so the update is taken against it")
    return notes


def _tied_head(ft: Checkpoint, bs: Checkpoint, out: dict[str, Delta], paired: set[str],
               skipped: Skipped) -> None:
    """A fine-tune with a tied head against a base with its own: ΔW = embedding′ − lm_head."""
    head = bs.find(TIED_HEAD)
    embed = ft.embedding_key()
    for key in bs.store:
        if key in paired or len(bs.store.shape(key)) != 2:
            continue
        if key == head and match_key(key) == TIED_HEAD and ft.tied and embed is not None \
                and ft.store.shape(embed) == bs.store.shape(key):
            name = key.removesuffix(".weight")
            out[name] = _full_delta(ft, bs, embed, key, name, False)
        else:
            skipped.append((key, "only in the base checkpoint"))


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

    def parts() -> tuple[torch.Tensor, torch.Tensor]:  # as stored: the engine up-casts
        t, b = ft.store.get(key), bs.store.get(base_key)
        return (t.T, b.T) if conv else (t, b)

    return _delta.dense(name, shape, load, method="full", source=source, base=base_w, parts=parts)
