"""PEFT FourierFT adapters (``peft_type: FOURIERFT``): ΔW = Re(IFFT2(S))·scaling, a dense update.

S is (out, in), zero except at n frequencies where it holds ``fourierft_spectrum`` (n,). The
frequencies are not saved: PEFT draws them from ``random_loc_seed`` as the first n entries of
``torch.randperm(out·in)`` of a seeded ``torch.Generator`` (row = i // in, column = i % in;
``fourierft/layer.py``), reproduced here exactly. ``scaling`` from the config. The module shapes
are not saved either, so the base is needed (for the shapes only; ΔW does not depend on W).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("FOURIERFT",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("fourierft_spectrum",)
SCHEMA: schema.Schema = {
    "random_loc_seed": schema.Key("int", 0, schema.MAX_SEED),
    "scaling": schema.Key("number"),
    "n_frequency": schema.Key("int", 1, schema.MAX_COUNT),
    "fan_in_fan_out": schema.Key("bool"),
}
NEEDS_BASE = "a FourierFT adapter does not save the shapes of its modules (only their spectra)"


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's dense ΔW in a PEFT FourierFT adapter folder."""
    ctx = peft_common.open_adapter(folder, base, skipped, SCHEMA)
    seed, scaling = ctx.config.get("random_loc_seed", 777), ctx.config.get("scaling", 150.0)
    if not isinstance(seed, int) or isinstance(seed, bool) or \
            not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise ConfigError(f"{ctx.config_path}: needs an integer random_loc_seed and a numeric "
                          "scaling")
    groups = peft_common.group(ctx, PARTS)
    peft_extras.matching(ctx, groups, "FourierFT")
    bs = peft_common.require_base(ctx, NEEDS_BASE)
    fan_in_fan_out = bool(ctx.config.get("fan_in_fan_out"))
    out = {}
    for name, keys in groups.parts():
        shape = bs.canonical_shape(name, fan_in_fan_out)
        out[name] = _module(ctx, name, keys["fourierft_spectrum"], shape, seed, float(scaling),
                            bs.oriented(name, shape, fan_in_fan_out))
    return peft_extras.finish(ctx, out, groups, "FourierFT")


def frequencies(shape: tuple[int, int], n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (rows, cols) of the n spectral entries PEFT trains for an (out, in) layer."""
    flat = torch.randperm(shape[0] * shape[1], generator=torch.Generator().manual_seed(seed))[:n]
    return flat // shape[1], flat % shape[1]


def _module(ctx: Adapter, name: str, key: str, shape: tuple[int, int], seed: int, scaling: float,
            base: Callable[[], torch.Tensor]) -> Delta:
    stored = ctx.shape(key)
    if len(stored) != 1 or not 0 < stored[0] <= shape[0] * shape[1]:
        raise CheckpointError(f"{ctx.source}: {key} has shape {stored}; expected (n,) with "
                              f"n ≤ {shape[0]}·{shape[1]} for the base's {shape} weight")

    def load() -> torch.Tensor:
        rows, cols = frequencies(shape, stored[0], seed)
        dense = torch.zeros(shape, dtype=torch.float64)
        dense[rows, cols] = ctx.get64(key)
        return torch.fft.ifft2(dense).real * scaling

    return _delta.dense(name, shape, load, method="fourierft", source=ctx.source, base=base,
                        bias=peft_extras.module_bias(ctx, name, shape[0]))
