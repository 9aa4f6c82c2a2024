"""Live objects as checkpoints: a PeftModel, an ``nn.Module``, a state dict (Jupyter's models).

Nothing here imports torch.nn, peft or transformers: objects are read by what they expose.

- A **PeftModel** (it has ``peft_config`` and ``base_model``): the chosen adapter (the active one
  by default) becomes the tensors PEFT's ``save_pretrained`` would write — the adapter's own
  parameters with the adapter name taken out of their keys — and its config the dict it would
  write; the base model's weights (``base_layer``/``original_module`` parameters and every other
  one) become the base checkpoint. The same format loaders as on disk then read them, so the
  results are the on-disk ones. A module into which the adapter is *merged* holds W0 + ΔW in its
  base layer: that is refused (``unmerge_adapter()`` first), never analysed as if it were W0.
- An **nn.Module** of a full model (``state_dict()``, ``config.to_dict()`` when it has one) or a
  full model's **state dict**: a checkpoint like an HF folder, tied weights counted once (the one
  saved first, as ``save_pretrained`` keeps it).
- A PEFT-style adapter **state dict** (keys as saved) with its ``config`` (a dict or a PeftConfig).

Tensors are the parameters themselves (``state_dict()`` gives detached views): nothing is copied
until a module is analysed, one at a time.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltaspec.errors import CheckpointError, UsageError
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped
from deltaspec.loaders.peft.common import Adapter
from deltaspec.loaders.store import TensorStore

# Where PEFT keeps a wrapped module's original weights; dropped from the base keys.
BASE_PARTS = ("base_layer", "original_module")
TO_SAVE = "modules_to_save"


@dataclass
class MemoryAdapter:
    """An adapter held in memory: its config (as ``adapter_config.json`` would hold it) and its
    tensors (keys as ``adapter_model.safetensors`` would hold them)."""

    config: dict[str, Any]
    store: TensorStore
    source: str

    @property
    def config_path(self) -> Path:
        """What error messages call the config."""
        return Path(f"{self.source} config")

    def context(self, base: Checkpoint | None, skipped: Skipped) -> Adapter:
        """The builders' context, as :func:`deltaspec.loaders.peft.common.open_adapter` makes it
        for a folder."""
        return Adapter(self.store, self.config, base, self.source, self.config_path, skipped)


def is_live(obj: Any) -> bool:
    """True for what this module reads (not a path)."""
    return is_peft_model(obj) or is_module(obj) or is_state_dict(obj)


def describe(obj: Any) -> str:
    """How messages and reports name an update: its path or Hub id, or ``<PeftModel>`` etc."""
    if isinstance(obj, (str, Path)):
        return str(obj)
    if is_state_dict(obj):
        return f"<state dict of {len(obj)} tensors>"
    return f"<{type(obj).__name__}>"


def is_peft_model(obj: Any) -> bool:
    """A PeftModel (or its tuner model): it maps adapter names to configs in ``peft_config``."""
    return isinstance(getattr(obj, "peft_config", None), Mapping) and hasattr(obj, "state_dict") \
        and hasattr(obj, "base_model")


def is_module(obj: Any) -> bool:
    """An ``nn.Module`` (anything with ``state_dict()`` and ``named_parameters()``)."""
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "named_parameters", None))


def is_state_dict(obj: Any) -> bool:
    """A mapping of names to tensors."""
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def store_of(tensors: Mapping[str, torch.Tensor], label: str) -> TensorStore:
    """A :class:`TensorStore` over tensors in memory (no copy; ``label`` names them in errors)."""
    for key, t in tensors.items():
        why = "is on the meta device (no values: load the weights first)" if t.is_meta else \
            f"has {t.layout} layout (deltaspec reads dense tensors: call .to_dense())" \
            if t.layout != torch.strided else ""
        if why:
            raise UsageError(f"{label}: tensor {key!r} {why}")
    where = Path(label)
    store = TensorStore(dict.fromkeys(tensors, where))
    store._handles[where] = dict(tensors)  # a dict handle: TensorStore reads it as a state dict
    return store


def checkpoint_of(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None,
                  label: str) -> Checkpoint:
    """A base/full :class:`Checkpoint` over tensors in memory."""
    return Checkpoint.of(store_of(tensors, label), dict(config or {}), Path(label))


def untied(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share memory with an earlier one left out (tied weights:
    ``lm_head.weight`` is ``embed_tokens.weight``), as ``save_pretrained`` writes it."""
    seen: set[tuple[Any, ...]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        plain = t.numel() and t.layout == torch.strided and not t.is_meta  # else refused later
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 t.stride()) if plain else None
        if ident is not None and ident in seen:
            continue
        if ident is not None:
            seen.add(ident)
        out[key] = t
    return out


def model_config(obj: Any) -> dict[str, Any]:
    """``obj.config.to_dict()`` (a transformers model's config), or {}."""
    cfg = getattr(obj, "config", None)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else {}


def as_json(config: Any) -> dict[str, Any]:
    """A PeftConfig (or dict) as ``adapter_config.json`` holds it (sets → lists, enums → values)."""
    raw = config.to_dict() if callable(getattr(config, "to_dict", None)) else config
    if not isinstance(raw, Mapping):
        raise UsageError(f"config: expected a dict or a PEFT config, not {type(config).__name__}")

    def plain(x: Any) -> Any:
        if isinstance(x, (set, frozenset)):
            return sorted(x, key=str)
        raise TypeError(type(x).__name__)

    try:
        return json.loads(json.dumps(dict(raw), default=plain))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"config: not serialisable as adapter_config.json ({exc})") from None


def full_checkpoint(obj: Any, label: str, config: Mapping[str, Any] | None = None) -> Checkpoint:
    """A full model (nn.Module or state dict) as a checkpoint."""
    if is_module(obj):
        return checkpoint_of(untied(obj.state_dict()), config or model_config(obj), label)
    if is_state_dict(obj):
        return checkpoint_of(untied(obj), config, label)
    raise UsageError(f"{label}: expected a path, a Hub id, a PeftModel, an nn.Module or a state "
                     f"dict, not {type(obj).__name__}")


def active_adapter(model: Any, adapter_name: str | None) -> str:
    """The adapter to read: ``adapter_name``, else the model's active one."""
    names = list(model.peft_config)
    if adapter_name is not None:
        if adapter_name not in names:
            raise UsageError(f"adapter_name={adapter_name!r}: the model has adapter(s) {', '.join(names)}")
        return adapter_name
    active = getattr(model, "active_adapter", None)
    active = active[0] if isinstance(active, (list, tuple)) and len(active) == 1 else active
    if isinstance(active, str) and active in names:
        return active
    if len(names) == 1:
        return names[0]
    raise UsageError(f"the model has several adapters ({', '.join(names)}) and no single active "
                     "one; pass adapter_name=")


def _merged_into(model: Any, name: str) -> list[str]:
    return [mod for mod, layer in model.named_modules()
            if name in (getattr(layer, "merged_adapters", None) or [])]


def split_peft(model: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(adapter tensors as PEFT saves them, base model tensors) of adapter ``name``."""
    others = set(model.peft_config) - {name}
    adapter: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        parts = key.split(".")
        if name in parts[1:]:
            i = parts.index(name, 1)
            drop = {i, i - 1} if parts[i - 1] == TO_SAVE else {i}
            adapter[".".join(p for j, p in enumerate(parts) if j not in drop)] = t
        elif not others.intersection(parts[1:]):
            plain = ".".join(p for p in parts if p not in BASE_PARTS)
            base[plain.removeprefix("base_model.model.")] = t
    return adapter, untied(base)


def peft_model(model: Any, adapter_name: str | None = None) -> tuple[MemoryAdapter, Checkpoint]:
    """A live PeftModel's adapter and its base model (see the module docstring)."""
    name = active_adapter(model, adapter_name)
    label = f"<{type(model).__name__} adapter {name!r}>"
    merged = _merged_into(model, name)
    if merged:
        raise UsageError(f"{label}: merged into the base weights of {len(merged)} module(s), e.g. "
                         f"{merged[0]}; its base layers hold W0 + ΔW, not W0: call "
                         "model.unmerge_adapter() first")
    adapter, base = split_peft(model, name)
    if not adapter:
        raise CheckpointError(f"{label}: no parameters of this adapter in the model")
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = as_json(model.peft_config[name])
    return (MemoryAdapter(config, store_of(adapter, label), label),
            checkpoint_of(base, model_config(inner), f"<base model of {label[1:-1]}>"))


def adapter_state(state: Mapping[str, torch.Tensor], config: Any) -> MemoryAdapter:
    """A PEFT-style adapter state dict (keys as saved) with its config."""
    if not is_state_dict(state):
        raise UsageError("state dict: expected a mapping of names to tensors")
    return MemoryAdapter(as_json(config), store_of(state, "<adapter state dict>"), "<adapter state dict>")


__all__ = ["MemoryAdapter", "active_adapter", "adapter_state", "as_json", "checkpoint_of", "describe",
           "full_checkpoint", "is_live", "is_module", "is_peft_model", "is_state_dict",
           "model_config", "peft_model", "split_peft", "store_of", "untied"]
