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
   :class:`~deltaspec.options.Options` (its flag is generated from the field's metadata).

The base checkpoint (``--base``) is opened once here (:mod:`deltaspec.loaders.checkpoint`) and
handed to the loader, or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError, UnsupportedError, UsageError
from deltaspec.loaders import full
from deltaspec.loaders.checkpoint import Checkpoint, base_for
from deltaspec.loaders.contract import FormatModule, Source
from deltaspec.loaders.multi import lora_moe, mixlora, mtl_lora, multilora
from deltaspec.loaders.peft import adalora, boft, fourierft, ia3, loha, lokr, oft, vera
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import lora as peft_lora
from deltaspec.loaders.sources import hub as sources
from deltaspec.loaders.sources import live
from deltaspec.loaders.store import exists
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
    Hub id ``org/name[@revision]`` (cached or downloaded: :mod:`deltaspec.loaders.sources.hub`)."""
    p = sources.locate(path, revision)
    if not exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    return p.parent if p.is_file() else p


def detect_format(path: Any) -> str:
    """The name of the format of the checkpoint at ``path`` (or of a live object)."""
    if live.is_live(path):
        return dispatch(_live_source(path, None, Options(discover_base=False), config=None)[0])[0]
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


def load(path: Any, base: Any = None, *, config: Any = None, **options: Any) -> Deltas:
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
        source, base_ck = _live_source(side.given, side.base, opts, config=side.config)
        fmt, module = dispatch(source)
    else:
        source, base_ck = side.folder, _checkpoint(side.base)
        fmt, module = (side.format, dict(FORMATS)[side.format]) if side.format \
            else dispatch(source)
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


def _checkpoint(base: Any) -> Checkpoint | None:
    """The opened base: a live object as is, a located folder, or None."""
    if base is not None and live.is_live(base):
        return live.full_checkpoint(base, "<base model>")
    return base_for(base)


def _live_source(obj: Any, base: Any, opts: Options, *,
                 config: Any) -> tuple[Source, Checkpoint | None]:
    """(the source, its base) of a live object (see :mod:`deltaspec.loaders.sources.live`): a
    PeftModel's adapter with its own base, an adapter state dict with its config, or a full
    model as a :class:`Checkpoint`; ``base``: the plan's (a live object, a located folder, or
    None)."""
    base_ck = _checkpoint(base)
    if live.is_peft_model(obj):
        adapter, own = live.peft_model(obj, opts.adapter_name)
        return adapter, base_ck or (own if opts.discover_base else None)
    if config is not None:
        return live.adapter_state(obj, config), base_ck
    if live.is_state_dict(obj) and any(k.startswith(PEFT_PREFIX) for k in obj):
        raise UsageError("<adapter state dict>: a PEFT adapter's tensors need its config: pass "
                         "config= (its PeftConfig, or adapter_config.json as a dict)")
    return live.full_checkpoint(obj, "<fine-tuned model>"), base_ck


__all__ = ["FORMATS", "Checkpoint", "Deltas", "detect_format", "dispatch", "load", "load_side",
           "resolve"]
