"""Checkpoint → ``dict[str, Delta]``: auto-detection through a table of formats.

Each entry of ``FORMATS`` is (name, detect(folder) -> bool, load(folder, base, skipped, opts)).
The first format whose ``detect`` accepts the folder loads it; a new format is one new row.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError
from deltaspec.loaders import multilora, peft_lora
from deltaspec.loaders.full import Checkpoint, base_for, load_full, open_weights_exists


class Deltas(dict[str, Delta]):
    """Module name → Delta, plus what was skipped and why (``.skipped``) and the ``.format``."""

    def __init__(self, items: dict[str, Delta], fmt: str, skipped: list[tuple[str, str]]) -> None:
        super().__init__(items)
        self.format = fmt
        self.skipped = skipped


Loader = Callable[[Path, Path | None, list[tuple[str, str]], dict[str, Any]], dict[str, Delta]]


def _peft(path: Path, base: Path | None, skipped: list[tuple[str, str]],
          opts: dict[str, Any]) -> dict[str, Delta]:
    return peft_lora.load_peft(path, base_for(base), skipped,
                               allow_modified_base=opts.get("allow_modified_base", False))


def _multilora(path: Path, base: Path | None, skipped: list[tuple[str, str]],
               opts: dict[str, Any]) -> dict[str, Delta]:
    return multilora.load_multilora(path, base_for(base), skipped)


def _full(path: Path, base: Path | None, skipped: list[tuple[str, str]],
          opts: dict[str, Any]) -> dict[str, Delta]:
    return load_full(path, resolve(base) if base is not None else None, skipped)


FORMATS: list[tuple[str, Callable[[Path], bool], Loader]] = [
    ("peft-lora", peft_lora.detect, _peft),
    ("multilora", multilora.detect, _multilora),
    ("full", open_weights_exists, _full),
]


def resolve(path: str | Path) -> Path:
    """The checkpoint folder for ``path`` (a folder, or a weights file inside one)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    return p.parent if p.is_file() else p


def detect_format(path: str | Path) -> str:
    """The name of the format of the checkpoint at ``path``."""
    folder = resolve(path)
    for name, detect, _ in FORMATS:
        if detect(folder):
            return name
    orphan = next((w for w in peft_lora.WEIGHTS if (folder / w).is_file()), None)
    if orphan is not None:
        raise ConfigError(f"{folder / peft_lora.CONFIG}: missing (needed to read {orphan}: it "
                          "gives lora_alpha and the other settings of the adapter)")
    raise CheckpointError(f"{folder}: not a checkpoint deltaspec knows (no adapter_config.json, "
                          "multilora_config.json or model weights)")


def load(path: str | Path, base: str | Path | None = None, *,
         allow_modified_base: bool = False) -> Deltas:
    """Load every module's ΔW from a PEFT adapter, a MultiLoRA folder or a full checkpoint.

    Args:
        path: the checkpoint folder (or a weights file in it).
        base: the base model folder: required for full checkpoints and DoRA, optional otherwise
            (it orients GPT-2 Conv1D weights, turns modules_to_save into deltas and enables the
            base-relative metrics).
        allow_modified_base: read PiSSA/OLoRA/… adapters anyway (s·B·A is then not the update).

    Returns:
        A dict (module name → Delta) with ``.format`` and ``.skipped`` (name, reason) attributes.
        Nothing is read from the weight files until a Delta's tensors are asked for.
    """
    folder = resolve(path)
    fmt = detect_format(folder)
    loader = next(f for name, _, f in FORMATS if name == fmt)
    skipped: list[tuple[str, str]] = []
    base_path = Path(base) if base is not None else None
    items = loader(folder, base_path, skipped, {"allow_modified_base": allow_modified_base})
    if not items:
        why = f"; skipped {len(skipped)} tensor(s), e.g. {skipped[0][0]} ({skipped[0][1]})" \
            if skipped else ""
        raise CheckpointError(f"{folder}: no weight update found{why}")
    return Deltas(dict(sorted(items.items(), key=lambda kv: _order(kv[0]))), fmt, skipped)


def _order(name: str) -> tuple[Any, ...]:
    """Sort modules by their path with numbers compared as numbers (layers.2 before layers.10)."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


__all__ = ["FORMATS", "Checkpoint", "Deltas", "detect_format", "load", "resolve"]
