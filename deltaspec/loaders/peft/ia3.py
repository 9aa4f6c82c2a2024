"""PEFT IA³ adapters (``peft_type: IA3``): learned vectors l that rescale a layer; needs the base.

PEFT merges W′ = W ⊙ l (``ia3/layer.py``): for an attention-type module l is (out, 1) and
ΔW = (diag(l) − I)·W (its bias is rescaled too: Δb = (l − 1) ⊙ b); for a module listed in
``feedforward_modules`` l is (1, in) and ΔW = W·(diag(l) − I) (bias unchanged). For Linear and
Conv1D layers the stored shape of l says which; a conv layer's l is (1, c, 1, 1) either way, so
there ``feedforward_modules`` (matched like PEFT: a regex fully matching the module path, or a
list of suffixes) decides, and a feed-forward l scales every kernel position of its input
channel. Dense (the update is a rescaled base weight).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltaspec import delta as _delta
from deltaspec import patterns
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, UnsupportedError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("IA3",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("ia3_l",)
SCHEMA: schema.Schema = {
    "feedforward_modules": schema.Key("strs", nullable=True),
    "target_modules": schema.Key("strs", nullable=True),
    "fan_in_fan_out": schema.Key("bool"),
}
NEEDS_BASE = "an IA3 update rescales the base weight (ΔW = W·(diag(l) − I) or (diag(l) − I)·W)"


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's dense ΔW in a PEFT IA³ adapter folder."""
    return peft_extras.load_modules(folder, base, skipped, parts=PARTS, what="IA3",
                                    module=_module, needs_base=NEEDS_BASE, config_schema=SCHEMA)


def is_feedforward(ctx: Adapter, name: str) -> bool:
    """PEFT's ``_check_target_module_feedforward`` on the module path ``name``."""
    spec = ctx.config.get("feedforward_modules") or []
    if isinstance(spec, str):
        return patterns.fullmatch(spec, name, f"{ctx.config_path}: feedforward_modules")
    return any(name.endswith(str(k)) for k in spec)


def _module(ctx: Adapter, bs: Checkpoint | None, name: str, keys: dict[str, str]) -> Delta:
    assert bs is not None  # NEEDS_BASE
    key = keys["ia3_l"]
    fan_in_fan_out = bool(ctx.config.get("fan_in_fan_out"))
    shape = bs.canonical_shape(name, fan_in_fan_out)
    stored = ctx.shape(key)
    base = bs.oriented(name, shape, fan_in_fan_out)
    base_key = bs.find(name + ".weight") or ""
    kernel = len(bs.store.shape(base_key)) > 2
    row, col = stored == (shape[0], 1), stored == (1, shape[1])
    repeat = 1
    if kernel:
        ff = is_feedforward(ctx, name)
        channels = bs.store.shape(base_key)[1] if ff else shape[0]
        if stored[0] != 1 or len(stored) < 2 or stored[1] != channels or any(x != 1 for x in stored[2:]):
            raise UnsupportedError(f"{ctx.source}: {key} has shape {stored}; deltaspec reads IA3 "
                                   f"on ungrouped conv layers ({channels} channels here)")
        repeat = shape[1] // channels if ff else 1
    elif row or col:
        ff = col if row != col else is_feedforward(ctx, name)
    else:
        raise CheckpointError(f"{ctx.source}: {key} has shape {stored}, neither ({shape[0]}, 1) "
                              f"nor (1, {shape[1]}) for the base's {shape} weight")

    def scale() -> torch.Tensor:  # l − 1, per row (out) or per column (in·k…)
        lm1 = ctx.get64(key).reshape(-1) - 1.0
        return lm1.repeat_interleave(repeat) if ff else lm1

    def load() -> torch.Tensor:
        w = base().to(torch.float64)
        return w * scale()[None, :] if ff else w * scale()[:, None]

    return _delta.dense(name, shape, load, method="ia3", source=ctx.source, base=base,
                        bias=None if ff else _bias(ctx, bs, name, scale, shape[0]))


def _bias(ctx: Adapter, bs: Checkpoint, name: str, scale: Callable[[], torch.Tensor],
          out: int) -> Callable[[], torch.Tensor] | None:
    """Δb = (l − 1) ⊙ b of an attention-type module with a bias (None without one)."""
    key = bs.find(name + ".bias")
    if key is None:
        return peft_extras.module_bias(ctx, name, out)
    return lambda: scale() * bs.tensor(key).to(torch.float64)
