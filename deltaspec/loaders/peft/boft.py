"""PEFT BOFT adapters (``peft_type: BOFT``): a butterfly product of permuted block-diagonal rotations.

PEFT merges W′ = (M·Wᵀ)ᵀ ⊙ s = W·Mᵀ ⊙ s (``boft/layer.py``; conv kernels flattened to
(out, in·kh·kw); ``boft_s`` (out, 1), or (1, out) for conv, broadcast exactly as PEFT does), so
ΔW = (W·Mᵀ) ⊙ s − W; it needs the base. ``boft_R`` is (N, D, H, H): N butterfly factors of D
blocks H×H, each block the Cayley transform (I − S)(I + S)⁻¹ of S = (R − Rᵀ)/2, and
M = Mₙ₋₁⋯M₁M₀ with Mᵢ = Pᵢ·diag(blocks of factor i)·Pᵢᵀ, Pᵢ PEFT's block butterfly permutation
for D/2ⁱ blocks of H/2. Applied to W factor by factor (never an in×in matrix). Dense.
"""

from __future__ import annotations

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ShapeError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("BOFT",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("boft_R", "boft_s")
SCHEMA: schema.Schema = {
    "boft_block_size": schema.Key("int", 0, schema.MAX_RANK),
    "boft_block_num": schema.Key("int", 0, schema.MAX_RANK),
    "boft_n_butterfly_factor": schema.Key("int", 0, 64),
    "fan_in_fan_out": schema.Key("bool"),
}
NEEDS_BASE = "a BOFT update rotates and scales the base weight (ΔW = W·Mᵀ ⊙ s − W)"


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's dense ΔW in a PEFT BOFT adapter folder."""
    return peft_extras.load_modules(folder, base, skipped, parts=PARTS, what="BOFT",
                                    module=_module, needs_base=NEEDS_BASE, config_schema=SCHEMA)


def butterfly_perm(n: int, blocks: int, r: int, factors: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm(n, blocks, r, factors)``: within each of ``blocks`` chunks,
    the r-sized groups are reordered evens first, then odds (identity when ``factors`` is 0)."""
    if factors == 0:
        return torch.arange(n)
    if blocks * r * 2 > n:
        raise CheckpointError(f"BOFT: invalid butterfly ({blocks} blocks of {r} for {n} features)")
    size = n // blocks
    step = size / r
    groups = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2))).long()
    order = torch.cat([torch.arange(int(g) * r, int(g) * r + r) for g in groups])
    return torch.cat([lo + order for lo in range(0, n, size)])


def cayley(r: torch.Tensor) -> torch.Tensor:
    """(I − S)(I + S)⁻¹ of S = (R − Rᵀ)/2, for a batch of blocks (…, H, H)."""
    s = 0.5 * (r - r.transpose(-1, -2))
    eye = torch.eye(r.shape[-1], dtype=r.dtype).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def rotate(w: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """W·Mᵀ for the butterfly M of ``rot`` (N, D, H, H): W·Pᵢ·Bᵢᵀ·Pᵢᵀ for i = 0 … N−1."""
    n_fac, d, h, _ = rot.shape
    n = d * h
    for i in range(n_fac):
        perm = butterfly_perm(n, int(d / 2**i), int(h / 2), n_fac - 1)
        x = torch.empty_like(w)
        x[:, perm] = w  # W·Pᵢ (Pᵢ[j, perm[j]] = 1)
        x = torch.einsum("odh,dgh->odg", x.reshape(w.shape[0], d, h), rot[i]).reshape(w.shape)
        w = x[:, perm]  # ·Pᵢᵀ
    return w


def _module(ctx: Adapter, bs: Checkpoint | None, name: str, keys: dict[str, str]) -> Delta:
    assert bs is not None  # NEEDS_BASE
    for part in PARTS:
        if part not in keys:
            raise CheckpointError(f"{ctx.source}: module {name!r} has no {part} tensor")
    shape = bs.canonical_shape(name, None)
    r_shape, s_shape = ctx.shape(keys["boft_R"]), ctx.shape(keys["boft_s"])
    if len(r_shape) != 4 or r_shape[2] != r_shape[3] or r_shape[1] * r_shape[2] != shape[1] \
            or s_shape not in ((shape[0], 1), (1, shape[0])) \
            or (s_shape == (1, shape[0]) and shape[0] not in (1, shape[1])):
        raise ShapeError(f"{ctx.source}: {name}: boft_R {r_shape} / boft_s {s_shape} do not fit "
                         f"the base's {shape} weight")
    n_fac, d, h = r_shape[:3]
    if n_fac < 1 or (n_fac > 1 and (h < 2 or h % 2 or d % 2 ** (n_fac - 1))):
        raise ShapeError(f"{ctx.source}: {keys['boft_R']} has shape {r_shape}: {n_fac} butterfly "
                         f"factor(s) need blocks of an even size ≥ 2 (not {h}) and a block count "
                         f"divisible by 2^{n_fac - 1} (not {d})")
    base = bs.oriented(name, shape, None)

    def load() -> torch.Tensor:
        w = base().to(torch.float64)
        rot = cayley(ctx.get64(keys["boft_R"]))
        return rotate(w, rot) * ctx.get64(keys["boft_s"]) - w

    return _delta.dense(name, shape, load, method="boft", source=ctx.source, base=base,
                        bias=peft_extras.module_bias(ctx, name, shape[0]))
