"""PEFT AdaLoRA adapters (``peft_type: ADALORA``): an SVD-shaped LoRA whose rank is pruned in training.

ΔW = B·(A ⊙ E)·α/(init_r + 10⁻⁵), the formula of PEFT's ``SVDLinear.get_delta_weight``, with
``lora_A`` (r, in), ``lora_E`` (r, 1), ``lora_B`` (out, r) as saved: PEFT saves the pruned rank
(``rank_pattern`` masks already applied), and ``ranknum`` — not saved — is ``init_r``, the rank
the modules were created with (kept through pruning). α is ``lora_alpha``, or the saved rank when
``lora_alpha`` ≤ 0. Conv2d modules flatten to (out, in·kh·kw) like LoRA's. Factored, rank r.
"""

from __future__ import annotations

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("ADALORA",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("lora_A", "lora_B", "lora_E")
EPS = 1e-5  # PEFT adds it to ranknum
SCHEMA: schema.Schema = {
    "lora_alpha": schema.Key("number"),
    "init_r": schema.Key("int", 1, schema.MAX_RANK),
    "target_r": schema.Key("int", 0, schema.MAX_RANK),
    "fan_in_fan_out": schema.Key("bool"),
}
# LoraConfig options AdaLoRA inherits but whose adapters are not B·(A⊙E)·α/ranknum.
UNSUPPORTED = {"use_dora": peft_common.truthy, "lora_bias": peft_common.truthy,
               "use_qalora": peft_common.truthy, "layer_replication": peft_common.truthy,
               "target_parameters": peft_common.truthy,
               "init_lora_weights": lambda v: str(v).lower().startswith(("pissa", "olora", "corda",
                                                                          "loftq", "eva"))}


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's factored ΔW in a PEFT AdaLoRA adapter folder."""
    ctx = peft_common.open_adapter(folder, base, skipped, SCHEMA)
    peft_common.check_options(ctx, UNSUPPORTED)
    groups = peft_common.group(ctx, PARTS)
    out = {}
    for name, keys in groups.parts():
        if "lora_A" in keys and ctx.shape(keys["lora_A"])[:1] == (0,):
            skipped.append((keys["lora_A"], "AdaLoRA pruned this module to rank 0 (ΔW = 0)"))
            continue
        out[name] = _module(ctx, name, keys)
    return peft_extras.finish(ctx, out, groups, "AdaLoRA")


def _number(ctx: Adapter, key: str, default: float) -> float:
    value = ctx.config.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CheckpointError(f"{ctx.config_path}: {key!r} must be a number, not {value!r}")
    return float(value)


def _module(ctx: Adapter, name: str, keys: dict[str, str]) -> Delta:
    for part in PARTS:
        if part not in keys:
            raise CheckpointError(f"{ctx.source}: module {name!r} has no {part} tensor")
    a_shape, b_shape, e_shape = (ctx.shape(keys[p]) for p in PARTS)
    r = a_shape[0] if a_shape else -1
    if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != r or e_shape != (r, 1):
        raise CheckpointError(f"{ctx.source}: {name}: lora_A {a_shape}, lora_E {e_shape} and "
                              f"lora_B {b_shape} are not (r, in), (r, 1), (out, r)")
    alpha = _number(ctx, "lora_alpha", 8)
    scale = (alpha if alpha > 0 else float(r)) / (_number(ctx, "init_r", 12) + EPS)
    shape = (b_shape[0], a_shape[1])

    def load() -> _delta.Factors:
        a = ctx.get64(keys["lora_A"]) * ctx.get64(keys["lora_E"])  # A ⊙ E (E broadcast per row)
        return ctx.get64(keys["lora_B"]) * scale, a

    fan_in_fan_out = bool(ctx.config.get("fan_in_fan_out"))
    return _delta.factored(name, shape, load, method="adalora", source=ctx.source, rank=r,
                           base=ctx.base_weight(name, shape, fan_in_fan_out),
                           bias=peft_extras.module_bias(ctx, name, shape[0]))


