"""Checkpoint → ``dict[str, Delta]``: auto-detection through one table of formats.

Every format is one module of this package exposing the contract of
:mod:`deltaspec.loaders.contract`: ``detect(folder) -> bool`` and
``load(folder, base, opts, skipped) -> dict[str, Delta]``. ``FORMATS`` holds one row per format,
(name, module), tried in order: the first module whose ``detect`` accepts the folder loads it.
PEFT adapters are told apart by the ``peft_type`` of their ``adapter_config.json``
(:func:`deltaspec.loaders.peft_common.detector`), so each PEFT method has its own module.

Adding a format:

1. one new file ``deltaspec/loaders/<format>.py`` with ``detect`` (claiming only its own
   checkpoints; a PEFT type: ``detect = peft_common.detector("TYPE")``) and ``load`` with the
   contract's signature, building :class:`~deltaspec.delta.Delta` objects (``delta.factored``,
   ``delta.dense``, ``delta.kronecker``) whose thunks read nothing until asked; every bad input a
   one-line :class:`~deltaspec.errors.DeltaspecError` naming the file or tensor;
2. one row ``("<name>", <module>)`` in ``FORMATS`` below;
3. its tests (genuine checkpoints, an independent oracle) and one line in the README's
   "Formats read". A new option the format needs is one field of
   :class:`~deltaspec.loaders.contract.LoadOptions`.

The base checkpoint (``--base``) is opened once here (:mod:`deltaspec.loaders.checkpoint`) and
handed to the loader, or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError, UnsupportedError
from deltaspec.loaders import (
    full,
    lora_moe,
    mixlora,
    mtl_lora,
    multilora,
    peft_common,
    peft_lora,
)
from deltaspec.loaders.checkpoint import Checkpoint, base_for
from deltaspec.loaders.contract import FormatModule, LoadOptions
from deltaspec.loaders.store import read_json


class Deltas(dict[str, Delta]):
    """Module name → Delta, plus what was skipped and why (``.skipped``), the ``.format`` and
    ``.notes`` (one-line remarks on how the deltas were read, e.g. an unsaved α)."""

    def __init__(self, items: dict[str, Delta], fmt: str, skipped: list[tuple[str, str]],
                 notes: list[str] | None = None) -> None:
        super().__init__(items)
        self.format = fmt
        self.skipped = skipped
        self.notes = list(notes or [])


FORMATS: tuple[tuple[str, FormatModule], ...] = (
    ("lora-moe", lora_moe),  # before peft-lora: a PEFT fork whose peft_type is still "LORA"
    ("peft-lora", peft_lora),
    ("mixlora", mixlora),
    ("multilora", multilora),
    ("mtl-lora", mtl_lora),
    ("full", full),
)


def resolve(path: str | Path) -> Path:
    """The checkpoint folder for ``path`` (a folder, or a weights file inside one)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return p.parent if p.is_file() else p


def detect_format(path: str | Path) -> str:
    """The name of the format of the checkpoint at ``path``."""
    folder = resolve(path)
    for name, module in FORMATS:
        if module.detect(folder):
            return name
    adapter = peft_common.find_adapter_dir(folder)
    if adapter is not None:
        kind = read_json(adapter / peft_common.CONFIG).get("peft_type")
        raise UnsupportedError(f"{adapter / peft_common.CONFIG}: peft_type {kind!r} is not "
                               f"supported (deltaspec reads {', '.join(supported_peft_types())} "
                               "adapters, MultiLoRA checkpoints and full fine-tunes)")
    orphan = next((w for w in peft_common.WEIGHTS if (folder / w).is_file()), None)
    if orphan is not None:
        raise ConfigError(f"{folder / peft_common.CONFIG}: missing (needed to read {orphan}: it "
                          "gives lora_alpha and the other settings of the adapter)")
    raise CheckpointError(f"{folder}: not a checkpoint deltaspec knows (no adapter_config.json, "
                          "multilora_config.json, final_checkpoint.pt or model weights)")


def supported_peft_types() -> list[str]:
    """The PEFT ``peft_type`` values some format module reads."""
    return [t for _, module in FORMATS for t in getattr(module, "PEFT_TYPES", ())]


def load(path: str | Path, base: str | Path | None = None, *,
         allow_modified_base: bool = False, lora_alpha: float | None = None,
         mtl_temperature: float | None = None) -> Deltas:
    """Load every module's ΔW from a PEFT adapter, a MultiLoRA folder or a full checkpoint.

    Args:
        path: the checkpoint folder (or a weights file in it).
        base: the base model folder: required for full checkpoints and DoRA, optional otherwise
            (it orients GPT-2 Conv1D weights, turns modules_to_save into deltas and enables the
            base-relative metrics).
        allow_modified_base: read PiSSA/OLoRA/… adapters anyway (s·B·A is then not the update).
        lora_alpha: α for checkpoints that do not save it (the MTL-LoRA code base's); without
            it their norms are reported with α/r = 1 (said in ``.notes``).
        mtl_temperature: MTL-LoRA's softmax temperature (not saved; default 1.0, the code
            base's default).

    Returns:
        A dict (module name → Delta) with ``.format``, ``.skipped`` (name, reason) and ``.notes``.
        Nothing is read from the weight files until a Delta's tensors are asked for.
    """
    folder = resolve(path)
    fmt = detect_format(folder)
    module = next(m for name, m in FORMATS if name == fmt)
    skipped: list[tuple[str, str]] = []
    opts = LoadOptions(allow_modified_base=allow_modified_base, lora_alpha=lora_alpha,
                       mtl_temperature=mtl_temperature)
    items = module.load(folder, base_for(Path(base) if base is not None else None), opts, skipped)
    if not items:
        why = f"; skipped {len(skipped)} tensor(s), e.g. {skipped[0][0]} ({skipped[0][1]})" \
            if skipped else ""
        raise CheckpointError(f"{folder}: no weight update found{why}")
    return Deltas(dict(sorted(items.items(), key=lambda kv: _order(kv[0]))), fmt, skipped,
                  getattr(items, "notes", []))


def _order(name: str) -> tuple[Any, ...]:
    """Sort modules by their path with numbers compared as numbers (layers.2 before layers.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


__all__ = ["FORMATS", "Checkpoint", "Deltas", "LoadOptions", "detect_format", "load", "resolve"]
