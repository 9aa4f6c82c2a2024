"""PEFT VeRA adapters (``peft_type: VERA``): frozen shared random projections, trained scaling vectors.

ΔW = diag(λ_b)·B[:out]·diag(λ_d)·A[:, :in] (PEFT's ``vera/layer.py`` ``get_delta_weight``) with
the model-level ``vera_A`` (r, max in) and ``vera_B`` (max out, r) saved once
(``save_projection=True``, PEFT's default) or, when not saved, regenerated exactly as PEFT does
from ``projection_prng_key`` (Kaiming-uniform from a seeded ``torch.Generator``, ``vera_A`` first)
at the largest (out, in) of the adapted modules. Per module ``vera_lambda_b`` (out,) and
``vera_lambda_d`` (r,). Factored, rank r. Each module's input size is not saved (``vera_A`` is
sliced to it), so the base is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta, check_bytes
from deltaspec.errors import CheckpointError, ConfigError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("VERA",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("vera_lambda_b", "vera_lambda_d")
SHARED = ("vera_A", "vera_B")
SCHEMA: schema.Schema = {
    "r": schema.Key("int", 1, schema.MAX_RANK),
    "projection_prng_key": schema.Key("int", 0, schema.MAX_SEED),
    "save_projection": schema.Key("bool"),
    "fan_in_fan_out": schema.Key("bool"),
}
NEEDS_BASE = "a VeRA adapter does not save each module's input size (the shared vera_A is sliced to it)"


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's factored ΔW in a PEFT VeRA adapter folder."""
    ctx = peft_common.open_adapter(folder, base, skipped, SCHEMA)
    groups = peft_common.group(ctx, PARTS, SHARED)
    peft_extras.matching(ctx, groups, "VeRA")
    bs = peft_common.require_base(ctx, NEEDS_BASE)
    fan_in_fan_out = bool(ctx.config.get("fan_in_fan_out"))
    shapes = {}
    for name, keys in groups.parts():
        for part in PARTS:
            if part not in keys:
                raise CheckpointError(f"{ctx.source}: module {name!r} has no {part} tensor")
        shapes[name] = bs.canonical_shape(name, fan_in_fan_out)
    projections = _projections(ctx, groups.shared, shapes,
                               [keys["vera_lambda_d"] for _, keys in groups.parts()])
    out = {name: _module(ctx, name, keys, shapes[name], projections, fan_in_fan_out)
           for name, keys in groups.parts()}
    return peft_extras.finish(ctx, out, groups, "VeRA")


Projections = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def _projections(ctx: Adapter, shared: dict[str, str], shapes: dict[str, tuple[int, int]],
                 lambda_d: list[str]) -> Projections:
    """A thunk of the shared (vera_A, vera_B) in float64: as saved, or regenerated like PEFT."""
    if "vera_A" in shared and "vera_B" in shared:
        return lambda: (ctx.get64(shared["vera_A"]), ctx.get64(shared["vera_B"]))
    if ctx.config.get("save_projection", True):
        raise CheckpointError(f"{ctx.source}: save_projection is true but the adapter holds no "
                              "base_model.vera_A / base_model.vera_B tensors")
    key, r = ctx.config.get("projection_prng_key", 0), ctx.config.get("r", 256)
    if not isinstance(key, int) or not isinstance(r, int) or r <= 0:
        raise ConfigError(f"{ctx.config_path}: needs an integer projection_prng_key and r")
    ranks = {ctx.shape(k) for k in lambda_d}
    if ranks != {(r,)}:
        raise ConfigError(f"{ctx.config_path}: r is {r} but the modules' vera_lambda_d have shapes "
                          f"{sorted(ranks)[:4]}: the shared projections cannot be regenerated")
    max_out = max(s[0] for s in shapes.values())
    max_in = max(s[1] for s in shapes.values())
    check_bytes(12 * r * (max_in + max_out), f"{ctx.config_path}: regenerating vera_A/vera_B")

    def regenerate() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cpu").manual_seed(key)
        a = _kaiming_uniform((r, max_in), gen)
        b = _kaiming_uniform((max_out, r), gen)
        return a.to(torch.float64), b.to(torch.float64)

    return regenerate


def _kaiming_uniform(shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """U(−b, b) with b = √3·√2/√fan_in, fan_in = shape[1], drawn from ``gen`` (PEFT's VeRA init)."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=gen)


def _module(ctx: Adapter, name: str, keys: dict[str, str], shape: tuple[int, int],
            projections: Projections, fan_in_fan_out: bool) -> Delta:
    b_shape, d_shape = ctx.shape(keys["vera_lambda_b"]), ctx.shape(keys["vera_lambda_d"])
    if b_shape != (shape[0],) or len(d_shape) != 1:
        raise CheckpointError(f"{ctx.source}: {name}: vera_lambda_b {b_shape} does not fit the "
                              f"base's ({shape[0]}, {shape[1]}) weight, or vera_lambda_d {d_shape} "
                              "is not (r,)")
    r = d_shape[0]

    def load() -> _delta.Factors:
        a, b = projections()
        if a.shape[0] != r or b.shape[1] != r or a.shape[1] < shape[1] or b.shape[0] < shape[0]:
            raise CheckpointError(f"{ctx.source}: shared vera_A {tuple(a.shape)} / vera_B "
                                  f"{tuple(b.shape)} do not fit module {name} {shape} of rank {r}")
        lam_b, lam_d = ctx.get64(keys["vera_lambda_b"]), ctx.get64(keys["vera_lambda_d"])
        return lam_b[:, None] * b[: shape[0]], lam_d[:, None] * a[:, : shape[1]]

    return _delta.factored(name, shape, load, method="vera", source=ctx.source, rank=r,
                           base=ctx.base_weight(name, shape, fan_in_fan_out),
                           bias=peft_extras.module_bias(ctx, name, shape[0]))
