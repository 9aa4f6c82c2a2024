"""HydraLoRA / LoRAMoE adapters (PEFT forks whose config has ``lora_nums``): one row per expert.

Keys (``base_model.model.`` prefix, ``adapter_model.bin``)::

    <m>.lora_A.weight (r, in)          shared by every head (HydraLoRA)
    <m>.lora_A{i}.weight (r, in)       one per expert (LoRAMoE)
    <m>.lora_B{i}.weight (out, r)      head / expert i
    <m>.lora_route.weight (n, in)      the router (skipped: input-dependent)

Expert i: ΔW_i = B_i·A(_i)·α/r, row ``<parent>.experts.<i>.<kind>``; the base is ``<m>``'s weight.
"""

from __future__ import annotations

import re

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.multi.moe import LORA_SCHEMA, ROUTER, announced, expert_delta, lora_scale
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import config as peft_config
from deltaspec.names import indexed, strip_peft_prefix
from deltaspec.options import Options

SCHEMA: schema.Schema = LORA_SCHEMA | {"lora_nums": schema.Key("int", 1, schema.MAX_COUNT, required=True)}
_KEY = re.compile(r"^(?P<mod>.+?)\.lora_(?P<part>A|B|route)(?P<i>\d*)(?:\.[^.]+)?\.weight$")


def detect(folder: Source) -> bool:
    """True for an adapter whose config has ``lora_nums`` (HydraLoRA's and LoRAMoE's PEFT forks)."""
    try:
        config = peft_common.adapter_config(folder)
    except (ConfigError, CheckpointError):
        return False  # an unreadable config: the format that claims it reports it
    return config is not None and peft_config.MOE_FORK_KEY in config


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every expert's ΔW of a HydraLoRA (shared lora_A) or LoRAMoE (lora_A{i}) adapter."""
    ctx = peft_common.open_adapter(folder, base, skipped, SCHEMA)
    config, store, source = ctx.config, ctx.store, ctx.source
    modules: dict[str, dict[str, str]] = {}
    for key in store:
        m = _KEY.match(strip_peft_prefix(key))
        if m is None or m["part"] == "route":
            skipped.append((key, ROUTER if m is not None else "not a HydraLoRA/LoRAMoE tensor"))
            continue
        modules.setdefault(m["mod"], {})[m["part"] + m["i"]] = key
    out = {}
    for mod, keys in modules.items():
        heads = sorted(int(p[1:]) for p in keys if p.startswith("B") and p[1:])
        if not heads or heads != list(range(len(heads))):
            raise CheckpointError(f"{source}: module {mod!r} has lora_B heads {heads}; expected "
                                  "lora_B0 … lora_B{n-1}")
        shared = "A" in keys
        for i in heads:
            a_key = keys.get("A" if shared else f"A{i}")
            if a_key is None:
                raise CheckpointError(f"{source}: module {mod!r} has no lora_A{'' if shared else i} "
                                      "tensor")
            name = indexed(mod, "experts", i)
            out[name] = expert_delta(store, source, name, a_key, keys[f"B{i}"],
                                     lambda r: lora_scale(config, r, ctx.config_path),
                                     "hydralora" if shared else "loramoe", base, mod)
    announced(ctx.config_path, peft_config.MOE_FORK_KEY, config[peft_config.MOE_FORK_KEY],
              {mod: [int(p[1:]) for p in keys if p.startswith("B") and p[1:]]
               for mod, keys in modules.items()})
    if not out:
        raise CheckpointError(f"{source}: holds no HydraLoRA/LoRAMoE expert tensors")
    return out
