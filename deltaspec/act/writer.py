"""Write a PEFT LoRA adapter folder that ``PeftModel.from_pretrained`` loads unchanged.

``adapter_config.json``: ``peft_type`` LORA, every written module named in ``target_modules``
(full paths) and in ``rank_pattern`` and ``alpha_pattern`` with α = r, so PEFT's scale α/r is 1
and ΔW = B·A exactly (rsLoRA off); ``base_model_name_or_path`` and ``task_type`` carried over from
the input. ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (k, in) and
``.lora_B.weight`` (out, k). GPT-2 ``Conv1D`` modules get ``fan_in_fan_out`` (PEFT's own rule for
them; the factors stay in (out, in) orientation). Modules kept at rank 0 are left out.

The folder is written whole into a hidden temporary folder beside ``--out`` and renamed onto it:
never half an adapter. An existing ``--out`` must be empty, or hold an earlier result of this
writer (an adapter config or ``compression.csv``) and ``overwrite`` be given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from deltaspec.atomic import NAME_MAX, output_error, this_rank_writes, tmp_name
from deltaspec.errors import OutputError
from deltaspec.names import CONV1D_MODULES, PEFT_PREFIX, kind_of

CONFIG, WEIGHTS, TABLE = "adapter_config.json", "adapter_model.safetensors", "compression.csv"
_OURS = (CONFIG, TABLE)  # what marks a folder as an earlier result (overwritable)
_CONV1D = frozenset().union(*CONV1D_MODULES.values())


def check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a Path, refused before any work when it cannot be written: it exists and is not
    empty (without ``overwrite``, or holding something that is not an earlier result)."""
    target = Path(out)
    if len(target.name.encode("utf-8", "surrogateescape")) > NAME_MAX:
        raise OutputError(f"--out {out}: not a valid folder name (over {NAME_MAX} bytes)")
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OutputError(f"--out {out}: folder exists and is not empty (pass --overwrite, "
                              "overwrite=True, to replace an earlier result)")
        if not any((target / name).is_file() for name in _OURS):
            raise OutputError(f"--out {out}: holds no earlier adapter or compression.csv; "
                              "refusing to replace it (choose an empty or new folder)")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"--out {out}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: folder {parent} is not writable")
    return target


def adapter_config(ranks: dict[str, int], source: dict[str, Any]) -> dict[str, Any]:
    """The ``adapter_config.json`` of a LoRA with these per-module ranks (α = r everywhere);
    ``source``: the input's config (``base_model_name_or_path``, ``task_type`` carried over).

    >>> c = adapter_config({"m.q_proj": 4, "m.k_proj": 2}, {"base_model_name_or_path": "b"})
    >>> c["r"], c["rank_pattern"], c["alpha_pattern"]["m.k_proj"], c["base_model_name_or_path"]
    (4, {'m.q_proj': 4, 'm.k_proj': 2}, 2, 'b')
    """
    common = Counter(ranks.values()).most_common(1)[0][0] if ranks else 1
    conv1d = bool(ranks) and all(kind_of(n) in _CONV1D for n in ranks)
    return {
        "peft_type": "LORA", "task_type": source.get("task_type"),
        "base_model_name_or_path": source.get("base_model_name_or_path"),
        "revision": source.get("revision"), "r": common, "lora_alpha": common,
        "target_modules": sorted(ranks), "rank_pattern": dict(ranks), "alpha_pattern": dict(ranks),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": conv1d, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }


def tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The safetensors keys of the written factors (module → (B (out, k), A (k, in)))."""
    out = {}
    for name, (b, a) in factors.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    return out


def write_folder(out: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 source: dict[str, Any], table_csv: str, overwrite: bool) -> None:
    """Write the adapter (when some module kept rank ≥ 1) and ``compression.csv`` into ``out``,
    atomically (a temporary folder, then a rename)."""
    from safetensors.torch import save_file

    if not this_rank_writes():
        return
    with _staged(out, overwrite) as tmp:
        if factors:
            ranks = {n: int(a.shape[0]) for n, (_, a) in factors.items()}
            (tmp / CONFIG).write_text(json.dumps(adapter_config(ranks, source), indent=2) + "\n",
                                      encoding="utf-8")
            save_file(tensors(factors), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / TABLE).write_text(table_csv, encoding="utf-8")


@contextlib.contextmanager
def _staged(out: Path, overwrite: bool) -> Iterator[Path]:
    target = check_out(out, overwrite)
    tmp = target.parent / tmp_name(target)
    old: Path | None = None
    try:
        tmp.mkdir()
        yield tmp
        if target.is_dir() and any(target.iterdir()):
            old = target.parent / tmp_name(target)
            os.replace(target, old)
        elif target.is_dir():
            target.rmdir()
        os.replace(tmp, target)
    except OSError as exc:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the earlier result back
            old = None
        raise output_error(out, exc) from None
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


__all__ = ["CONFIG", "TABLE", "WEIGHTS", "adapter_config", "check_out", "tensors", "write_folder"]
