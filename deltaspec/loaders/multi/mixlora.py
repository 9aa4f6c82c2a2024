"""MixLoRA adapters (TUDB-Labs/MixLoRA, ``"peft_type": "MIXLORA"``): one row per FFN expert.

Keys of ``adapter_model.bin`` (``torch.save``) or ``.safetensors``::

    mixlora.layers.{L}.self_attn.{proj}.lora_A/B.weight     attention LoRA: ΔW = B·A·s
    mixlora.layers.{L}.experts.{e}.{proj}.lora_A/B.weight   expert e of the FFN: ΔW_e = B_e·A_e·s_e
    mixlora.layers.{L}.gate.weight                          the router (skipped: input-dependent)

s = α/r (α/√r with ``use_rslora``); experts take r/α from ``expert_lora`` when it is given. Rows:
``model.layers.{L}.self_attn.{proj}`` and ``model.layers.{L}.mlp.experts.{e}.{proj}``, whose base
weight is the shared ``model.layers.{L}.mlp.{proj}``.
"""

from __future__ import annotations

import re

from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, UnsupportedError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.multi.moe import LORA_SCHEMA, ROUTER, announced, expert_delta, lora_scale
from deltaspec.loaders.peft import common as peft_common
from deltaspec.names import indexed
from deltaspec.options import Options

PEFT_TYPES = ("MIXLORA",)
detect = peft_common.detector(*PEFT_TYPES)
_KEY = re.compile(r"^mixlora\.layers\.(?P<layer>\d+)\.(?:(?P<attn>self_attn)|experts\.(?P<e>\d+))"
                  r"\.(?P<proj>[^.]+)\.lora_(?P<side>A|B)\.weight$")
_GATE = re.compile(r"^mixlora\.layers\.\d+\.gate\.weight$")
SCHEMA: schema.Schema = LORA_SCHEMA | {
    "num_experts": schema.Key("int", 1, schema.MAX_COUNT),
    "top_k": schema.Key("int", 1, schema.MAX_COUNT),
    "expert_lora": schema.Key("mapping", nullable=True),
}


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every attention LoRA and every FFN expert's ΔW of a MixLoRA adapter."""
    ctx = peft_common.open_adapter(folder, base, skipped, SCHEMA)
    config, store, source = ctx.config, ctx.store, ctx.source
    expert_cfg = config | (config.get("expert_lora") or {})
    schema.check(expert_cfg, LORA_SCHEMA, f"{ctx.config_path}: expert_lora")
    if config.get("use_dora") or expert_cfg.get("use_dora"):
        raise UnsupportedError(f"{ctx.config_path}: MixLoRA with use_dora is not supported")
    pairs: dict[tuple[str, str, bool], dict[str, str]] = {}
    for key in store:
        m = _KEY.match(key)
        if m is None:
            skipped.append((key, ROUTER if _GATE.match(key) else "not a MixLoRA tensor"))
            continue
        block = f"model.layers.{m['layer']}"
        if m["attn"]:
            name = base_name = f"{block}.self_attn.{m['proj']}"
        else:
            base_name = f"{block}.mlp.{m['proj']}"
            name = indexed(base_name, "experts", int(m["e"]))
        pairs.setdefault((name, base_name, not m["attn"]), {})[m["side"]] = key
    experts: dict[str, list[int]] = {}
    for (name, base_name, expert), _ in pairs.items():
        if expert:
            experts.setdefault(base_name, []).append(int(name.split(".experts.")[1].split(".")[0]))
    announced(ctx.config_path, "num_experts", config.get("num_experts"), experts)
    out = {}
    for (name, base_name, expert), keys in pairs.items():
        if set(keys) != {"A", "B"}:
            missing = "lora_B" if "A" in keys else "lora_A"
            raise CheckpointError(f"{source}: {next(iter(keys.values()))!r} has no {missing} "
                                  "partner")
        cfg = expert_cfg if expert else config
        out[name] = expert_delta(store, source, name, keys["A"], keys["B"],
                                 lambda r, c=cfg: lora_scale(c, r, ctx.config_path),
                                 "mixlora" if expert else "lora", base, base_name)
    if not out:
        raise CheckpointError(f"{source}: holds no MixLoRA tensors")
    return out
