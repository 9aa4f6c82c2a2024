"""Checkpoint → ``dict[str, Delta]``: auto-detection through one table of formats (imported on first
use through :mod:`deltaspec.loaders`, so that the package's torch-free modules stay torch-free).

Every format is one module of this package exposing the contract of
:mod:`deltaspec.loaders.contract`: ``detect(folder) -> bool`` and
``load(folder, base, opts, skipped) -> dict[str, Delta]``. ``FORMATS`` holds one row per format,
(name, module), tried in order by :func:`dispatch`: the first module whose ``detect`` accepts
the source loads it — a folder, an adapter in memory (a PeftModel's, or a state dict with its
config) or a full model in memory alike.
PEFT adapters are told apart by the ``peft_type`` of their ``adapter_config.json``
(:func:`deltaspec.loaders.peft.common.detector`), so each PEFT method has its own module.

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
from deltaspec.errors import CheckpointError, ConfigError, UnsupportedError, UsageError
from deltaspec.loaders import full
from deltaspec.loaders.checkpoint import Checkpoint, base_for
from deltaspec.loaders.contract import FormatModule, LoadOptions, Source
from deltaspec.loaders.multi import lora_moe, mixlora, mtl_lora, multilora
from deltaspec.loaders.peft import adalora, boft, fourierft, ia3, loha, lokr, oft, vera
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import lora as peft_lora
from deltaspec.loaders.sources import discovery, live
from deltaspec.loaders.sources import hub as sources
from deltaspec.loaders.store import exists
from deltaspec.names import PEFT_PREFIX, module_order


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
    Hub id ``org/name[@revision]`` (cached or downloaded: :mod:`deltaspec.loaders.sources.hub`)."""
    p = sources.locate(path, revision)
    if not exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    return p.parent if p.is_file() else p


def detect_format(path: Any) -> str:
    """The name of the format of the checkpoint at ``path`` (or of a live object)."""
    if live.is_live(path):
        return dispatch(_live_source(path, None, config=None, adapter_name=None,
                                     discover_base=False)[0])[0]
    return dispatch(resolve(path))[0]


def dispatch(source: Source) -> tuple[str, FormatModule]:
    """(name, module) of the first format in :data:`FORMATS` whose ``detect`` claims ``source``
    — a folder or an object in memory alike — or a one-line error saying what it is not."""
    for name, module in FORMATS:
        if module.detect(source):
            return name, module
    config = peft_common.adapter_config(source)
    if config is not None:
        where = getattr(source, "source", None) or \
            (peft_common.find_adapter_dir(Path(str(source))) or Path(str(source))) / peft_common.CONFIG
        raise UnsupportedError(f"{where}: peft_type {config.get('peft_type')!r} is not supported "
                               f"(deltaspec reads {', '.join(supported_peft_types())} adapters, "
                               "MultiLoRA, MTL-LoRA and mixture-of-LoRA checkpoints and full "
                               "fine-tunes)")
    folder = Path(str(source))
    orphan = next((w for w in peft_common.WEIGHTS if (folder / w).is_file()), None)
    if orphan is not None:
        raise ConfigError(f"{folder / peft_common.CONFIG}: missing (needed to read {orphan}: it "
                          "gives lora_alpha and the other settings of the adapter)")
    raise CheckpointError(f"{folder}: not a checkpoint deltaspec knows (no adapter_config.json, "
                          "multilora_config.json, final_checkpoint.pt or model weights)")


def supported_peft_types() -> list[str]:
    """The PEFT ``peft_type`` values some format module reads."""
    return [t for _, module in FORMATS for t in getattr(module, "PEFT_TYPES", ())]


def load(path: Any, base: Any = None, *, allow_modified_base: bool = False,
         discover_base: bool = True, revision: str | None = None, config: Any = None,
         adapter_name: str | None = None, lora_alpha: float | None = None,
         mtl_temperature: float | None = None) -> Deltas:
    """Load every module's ΔW from a PEFT adapter, a MultiLoRA folder or a full checkpoint.

    Args:
        path: the checkpoint folder (or a weights file in it), a Hugging Face Hub id
            ``org/name[@revision]`` (from the local cache, else downloaded), or a live object: a
            PeftModel, an ``nn.Module`` or state dict of a full model, a PEFT adapter state dict
            (with ``config``) — see :mod:`deltaspec.loaders.sources.live`.
        base: the base model (folder, Hub id, ``nn.Module`` or state dict): required for full
            checkpoints and DoRA, optional otherwise (it orients GPT-2 Conv1D weights, turns
            modules_to_save into deltas and enables the base-relative metrics). Omitted, the
            base the adapter's config names (``base_model_name_or_path``) is used when it
            resolves, and a PeftModel's own base weights; given, a warning says when it is not
            the named one.
        allow_modified_base: read PiSSA/OLoRA/… adapters anyway (s·B·A is then not the update).
        discover_base: False: never look for a base that was not given.
        revision: the revision of a Hub id ``path`` given without ``@revision``.
        config: the adapter config (dict or PeftConfig) of an adapter state dict ``path``.
        adapter_name: the adapter of a PeftModel (default: its active one).
        lora_alpha: α for checkpoints that do not save it (the MTL-LoRA code base's); without
            it their norms are reported with α/r = 1 (said in ``.notes``).
        mtl_temperature: MTL-LoRA's softmax temperature (not saved; default 1.0, the code
            base's default).

    Returns:
        A dict (module name → Delta) with ``.format``, ``.skipped`` (name, reason) and ``.notes``.
        Nothing is read from the weight files until a Delta's tensors are asked for.
    """
    skipped: list[tuple[str, str]] = []
    opts = LoadOptions(allow_modified_base=allow_modified_base, lora_alpha=lora_alpha,
                       mtl_temperature=mtl_temperature)
    if live.is_live(path) or config is not None:
        source, base_ck = _live_source(path, base, config=config, adapter_name=adapter_name,
                                       discover_base=discover_base)
    else:
        source = resolve(path, revision)
        base_ck = _base(base, source, discover_base)
    fmt, module = dispatch(source)
    where = str(getattr(source, "source", None) or getattr(source, "folder", source))
    if isinstance(source, Checkpoint) and base_ck is None:
        raise UsageError(f"{where}: a full model gives an update only against its base: pass "
                         "base= (a folder, a Hub id, an nn.Module or a state dict)")
    items = module.load(source, base_ck, opts, skipped)
    if not items:
        why = f"; skipped {len(skipped)} tensor(s), e.g. {skipped[0][0]} ({skipped[0][1]})" \
            if skipped else ""
        raise CheckpointError(f"{where}: no weight update found{why}")
    return Deltas(dict(sorted(items.items(), key=lambda kv: module_order(kv[0]))), fmt, skipped,
                  getattr(items, "notes", []))


def _base(base: Any, folder: Path | None, discover: bool) -> Checkpoint | None:
    """The base checkpoint: a live object as is, else located (path, Hub id, or the one the
    adapter at ``folder`` names)."""
    if base is not None and live.is_live(base):
        return live.full_checkpoint(base, "<base model>")
    if folder is None:
        path = sources.locate(base, what="base model") if base is not None else None
    else:
        path = discovery.choose_base(folder, base, discover=discover)
    return base_for(path)


def _live_source(obj: Any, base: Any, *, config: Any, adapter_name: str | None,
                 discover_base: bool) -> tuple[Source, Checkpoint | None]:
    """(the source, its base) of a live object (see :mod:`deltaspec.loaders.sources.live`): a
    PeftModel's adapter with its own base, an adapter state dict with its config, or a full
    model as a :class:`Checkpoint`."""
    base_ck = _base(base, None, False) if base is not None else None
    if live.is_peft_model(obj):
        adapter, own = live.peft_model(obj, adapter_name)
        return adapter, base_ck or (own if discover_base else None)
    if config is not None:
        return live.adapter_state(obj, config), base_ck
    if live.is_state_dict(obj) and any(k.startswith(PEFT_PREFIX) for k in obj):
        raise UsageError("<adapter state dict>: a PEFT adapter's tensors need its config: pass "
                         "config= (its PeftConfig, or adapter_config.json as a dict)")
    return live.full_checkpoint(obj, "<fine-tuned model>"), base_ck


__all__ = ["FORMATS", "Checkpoint", "Deltas", "LoadOptions", "detect_format", "dispatch", "load",
           "resolve"]
