"""Mixture-of-LoRA-experts adapters: one static ΔW per expert; the router is not folded in.

Shared helpers of the two formats :mod:`deltaspec.loaders.multi.mixlora` and
:mod:`deltaspec.loaders.multi.lora_moe`.

A router weighs the experts per token (input-dependent), so no single ΔW is the update: each
expert's own ΔW is reported as a row ``<parent>.experts.<e>.<kind>``, and router tensors are listed
as skipped. Two layouts, each with an ``adapter_config.json`` (lora_alpha, r) beside the weights
(``adapter_model.bin`` or ``.safetensors``):

- **MixLoRA** (TUDB-Labs, ``"peft_type": "MIXLORA"``): attention LoRA
  ``mixlora.layers.{L}.self_attn.{proj}.lora_A/B.weight`` (ΔW = B·A·α/r, α/√r with rsLoRA; row
  ``model.layers.{L}.self_attn.{proj}``) and FFN experts
  ``mixlora.layers.{L}.experts.{e}.{proj}.lora_A/B.weight`` (the same formula with the
  ``expert_lora`` overrides; row ``model.layers.{L}.mlp.experts.{e}.{proj}``, base
  ``model.layers.{L}.mlp.{proj}``); router ``mixlora.layers.{L}.gate.weight``.
- **HydraLoRA / LoRAMoE** (PEFT forks with ``lora_nums``): ``<m>.lora_A.weight`` shared
  (HydraLoRA) or ``<m>.lora_A{i}.weight`` per expert (LoRAMoE), heads ``<m>.lora_B{i}.weight``,
  router ``<m>.lora_route.weight``; expert i: ΔW_i = B_i·A(_i)·α/r.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deltaspec.delta import Delta
from deltaspec.errors import ConfigError
from deltaspec.loaders import build, schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.store import TensorStore

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
ROUTER = "router: input-dependent, not folded into ΔW"
# The LoRA keys both layouts' configs share (α required: it scales every expert).
LORA_SCHEMA: schema.Schema = {
    "lora_alpha": schema.Key("number", required=True),
    "r": schema.Key("int", 1, schema.MAX_RANK),
    "use_rslora": schema.Key("bool"),
    "use_dora": schema.Key("bool"),
}


def announced(where: Path, key: str, count: Any, found: dict[str, list[int]]) -> None:
    """A one-line ConfigError when the config announces ``count`` experts (``key``) but a
    module (``found``: module → the expert indices saved) holds another number of them."""
    if count is None:
        return
    for mod, indices in found.items():
        if sorted(indices) != list(range(count)):
            raise ConfigError(f"{where}: {key} is {count} but {mod} saves {len(indices)} "
                              f"expert(s) ({', '.join(map(str, sorted(indices)[:8]))})")


def lora_scale(config: dict[str, Any], r: int, where: Path) -> float:
    """α/r, or α/√r with ``use_rslora``."""
    schema.check(config, LORA_SCHEMA, where)
    alpha = config["lora_alpha"]
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def expert_delta(store: TensorStore, source: str, name: str, a_key: str, b_key: str, scale_of: Any,
                 method: str, base: Checkpoint | None, base_name: str) -> Delta:
    """The factored ΔW = B·A·s of one expert (``scale_of(r)`` gives s)."""
    f = build.lora_factors(store, source, name, a_key, b_key, scale_of)
    return build.factored(name, f, method=method, source=source,
                          base=base.oriented(base_name, f.shape) if base is not None else None)
