"""Checkpoint → ``dict[str, Delta]``: auto-detection through one table of formats (imported on first
use through :mod:`deltaspec.loaders`, so that the package's torch-free modules stay torch-free).

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
   :class:`~deltaspec.options.Options` (its flag is generated from the field's metadata).

The base checkpoint (``--base``) is opened once here (:mod:`deltaspec.loaders.checkpoint`) and
handed to the loader, or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError, UnsupportedError, UsageError
from deltaspec.loaders import (
    adalora,
    boft,
    fourierft,
    full,
    ia3,
    live,
    loha,
    lokr,
    lora_moe,
    mixlora,
    mtl_lora,
    multilora,
    oft,
    peft_common,
    peft_lora,
    sources,
    vera,
)
from deltaspec.loaders.checkpoint import Checkpoint, base_for
from deltaspec.loaders.contract import FormatModule
from deltaspec.loaders.store import exists, read_json
from deltaspec.names import PEFT_PREFIX, module_order
from deltaspec.options import Options, make_options

if TYPE_CHECKING:
    from deltaspec.plan import Side


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
    ("peft-adalora", adalora),
    ("peft-vera", vera),
    ("peft-loha", loha),
    ("peft-lokr", lokr),
    ("peft-ia3", ia3),
    ("peft-oft", oft),
    ("peft-boft", boft),
    ("peft-fourierft", fourierft),
    ("mixlora", mixlora),
    ("multilora", multilora),
    ("mtl-lora", mtl_lora),
    ("full", full),
)


def resolve(path: str | Path, revision: str | None = None) -> Path:
    """The checkpoint folder for ``path``: a folder, a weights file inside one, or a Hugging Face
    Hub id ``org/name[@revision]`` (cached or downloaded: :mod:`deltaspec.loaders.sources`)."""
    p = sources.locate(path, revision)
    if not exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    return p.parent if p.is_file() else p


def detect_format(path: str | Path) -> str:
    """The name of the format of the checkpoint at ``path`` (or of a live object)."""
    if live.is_live(path):
        return _live_format(path)
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


def load(path: Any, base: Any = None, *, config: Any = None, **options: Any) -> Deltas:
    """Load every module's ΔW from a PEFT adapter, a MultiLoRA folder or a full checkpoint.

    Args:
        path: the checkpoint folder (or a weights file in it), a Hugging Face Hub id
            ``org/name[@revision]`` (from the local cache, else downloaded), or a live object: a
            PeftModel, an ``nn.Module`` or state dict of a full model, a PEFT adapter state dict
            (with ``config``) — see :mod:`deltaspec.loaders.live`.
        base: the base model (folder, Hub id, ``nn.Module`` or state dict): required for full
            checkpoints and DoRA, optional otherwise (it orients GPT-2 Conv1D weights, turns
            modules_to_save into deltas and enables the base-relative metrics). Omitted, the
            base the adapter's config names (``base_model_name_or_path``) is used when it
            resolves, and a PeftModel's own base weights; given, a warning says when it is not
            the named one.
        config: the adapter config (dict or PeftConfig) of an adapter state dict ``path``.
        options: :class:`~deltaspec.options.Options` fields; those the loaders use:
            ``allow_modified_base`` (read PiSSA/OLoRA/… adapters anyway), ``discover_base``
            (False: never look for a base that was not given), ``revision`` (of a Hub id ``path``
            given without ``@revision``), ``adapter_name`` (of a PeftModel; default its active
            one), ``lora_alpha`` (α of checkpoints that do not save it, the MTL-LoRA code
            base's; without it α/r = 1, said in ``.notes``), ``mtl_temperature`` (MTL-LoRA's
            softmax temperature; default 1.0).

    Returns:
        A dict (module name → Delta) with ``.format``, ``.skipped`` (name, reason) and ``.notes``.
        Nothing is read from the weight files until a Delta's tensors are asked for.
    """
    from deltaspec import plan

    opts = make_options(options)
    return load_side(plan.side(path, base, opts, config), opts)


def load_side(side: Side, opts: Options) -> Deltas:
    """The deltas of one located side of a plan (:class:`deltaspec.plan.Side`: its folder, its
    format when detected, its decided base) read with ``opts``."""
    skipped: list[tuple[str, str]] = []
    if side.folder is None:
        fmt, where, items = _load_live(side.given, side.base, opts, skipped, config=side.config)
    else:
        fmt, where = side.format or detect_format(side.folder), str(side.folder)
        module = next(m for name, m in FORMATS if name == fmt)
        items = module.load(side.folder, _checkpoint(side.base), opts, skipped)
    if not items:
        why = f"; skipped {len(skipped)} tensor(s), e.g. {skipped[0][0]} ({skipped[0][1]})" \
            if skipped else ""
        raise CheckpointError(f"{where}: no weight update found{why}")
    return Deltas(dict(sorted(items.items(), key=lambda kv: module_order(kv[0]))), fmt, skipped,
                  getattr(items, "notes", []))


def _checkpoint(base: Any) -> Checkpoint | None:
    """The opened base: a live object as is, a located folder, or None."""
    if base is not None and live.is_live(base):
        return live.full_checkpoint(base, "<base model>")
    return base_for(base)


def _peft_module(peft_type: Any, where: str) -> tuple[str, FormatModule]:
    kind = str(peft_type).upper()
    for name, module in FORMATS:
        if kind in getattr(module, "PEFT_TYPES", ()):
            return name, module
    raise UnsupportedError(f"{where}: peft_type {peft_type!r} is not supported (deltaspec reads "
                           f"{', '.join(supported_peft_types())} adapters)")


def _live_format(obj: Any) -> str:
    if live.is_peft_model(obj):
        name = live.active_adapter(obj, None)
        return _peft_module(live.as_json(obj.peft_config[name]).get("peft_type"), "PeftModel")[0]
    return "full"


def _load_live(obj: Any, base: Any, opts: Options, skipped: list[tuple[str, str]], *,
               config: Any) -> tuple[str, str, dict[str, Delta]]:
    """(format, what errors call it, deltas) of a live object (see :mod:`deltaspec.loaders.live`);
    ``base``: the plan's (a live object, a located folder, or None)."""
    base_ck = _checkpoint(base)
    if live.is_peft_model(obj):
        adapter, own = live.peft_model(obj, opts.adapter_name)
        base_ck = base_ck or (own if opts.discover_base else None)
    elif config is not None:
        adapter = live.adapter_state(obj, config)
    elif live.is_state_dict(obj) and any(k.startswith(PEFT_PREFIX) for k in obj):
        raise UsageError("<adapter state dict>: a PEFT adapter's tensors need its config: pass "
                         "config= (its PeftConfig, or adapter_config.json as a dict)")
    else:
        ft = live.full_checkpoint(obj, "<fine-tuned model>")
        if base_ck is None:
            raise UsageError(f"{ft.folder}: a full model gives an update only against its base: "
                             "pass base= (a folder, a Hub id, an nn.Module or a state dict)")
        return "full", str(ft.folder), full.load(ft, base_ck, opts, skipped)  # type: ignore[arg-type]
    fmt, module = _peft_module(adapter.config.get("peft_type"), adapter.source)
    return fmt, adapter.source, module.load(adapter, base_ck, opts, skipped)  # type: ignore[arg-type]


__all__ = ["FORMATS", "Checkpoint", "Deltas", "detect_format", "load", "load_side", "resolve"]
