"""PEFT OFT adapters (``peft_type: OFT``): a block-diagonal orthogonal R acting on the input side.

PEFT merges W′ = (R·Wᵀ)ᵀ = W·Rᵀ (``oft/layer.py`` ``Linear.merge``; conv kernels flattened to
(out, in·kh·kw)), so ΔW = W·(Rᵀ − I); it needs the base. R = diag(R₁, …, R_n) with each block
built from the saved ``oft_R.weight`` row (the upper triangle of a skew-symmetric Q, row-major):
with ``coft`` the row is first projected to ‖Q‖_F ≤ eps/√(#rows); then the Cayley transform,
truncated like PEFT's Neumann series I + 2Q + 2Q² + … + Q^{t−1} (``use_cayley_neumann``, t =
``num_cayley_neumann_terms``) or exact (I − Q)(I + Q)⁻¹. With ``block_share`` one block is
repeated in/b times. Dense: the update is a rotated base weight.
"""

from __future__ import annotations

import math

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ShapeError, UnsupportedError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import extras as peft_extras
from deltaspec.loaders.peft.common import Adapter
from deltaspec.options import Options

PEFT_TYPES = ("OFT",)
detect = peft_common.detector(*PEFT_TYPES)
PARTS = ("oft_R", "oft_embedding_R")
MAX_NEUMANN_TERMS = 1000  # num_cayley_neumann_terms drives a loop of matrix products (PEFT: 5)
SCHEMA: schema.Schema = {
    "coft": schema.Key("bool"),
    "eps": schema.Key("number", 0, 1000000.0),
    "coft_eps": schema.Key("number", 0, 1000000.0),
    "use_cayley_neumann": schema.Key("bool"),
    "block_share": schema.Key("bool"),
    "num_cayley_neumann_terms": schema.Key("int", 0, MAX_NEUMANN_TERMS),
    "r": schema.Key("int", 0, schema.MAX_RANK),
    "oft_block_size": schema.Key("int", 0, schema.MAX_RANK),
}
NEEDS_BASE = "an OFT update rotates the base weight (ΔW = W·(Rᵀ − I))"


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's dense ΔW in a PEFT OFT adapter folder."""
    return peft_extras.load_modules(folder, base, skipped, parts=PARTS, what="OFT",
                                    module=_module, needs_base=NEEDS_BASE, config_schema=SCHEMA)


def skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """Skew-symmetric (n, b, b) matrices from (n, b(b−1)/2) upper-triangle rows (row-major)."""
    rows, cols = torch.triu_indices(b, b, 1)
    q = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(1, 2)


def cayley(q: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """PEFT's OFT Cayley map of skew-symmetric blocks q (n, b, b): the truncated Neumann series
    or the exact (I − Q)(I + Q)⁻¹."""
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    if not neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    r = eye.clone()
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def block_size(ctx: Adapter, key: str) -> tuple[int, int]:
    """(rows, b) of a saved OFT parameter (rows, b(b−1)/2)."""
    stored = ctx.shape(key)
    n_el = stored[-1] if len(stored) == 2 else -1
    b = (1 + math.isqrt(1 + 8 * n_el)) // 2 if n_el >= 0 else 0
    if b < 2 or b * (b - 1) // 2 != n_el:
        raise CheckpointError(f"{ctx.source}: {key} has shape {stored}, not (r, b·(b−1)/2)")
    return stored[0], b


def rotation_blocks(ctx: Adapter, key: str, n_blocks: int) -> torch.Tensor:
    """The (n_blocks, b, b) blocks of R (float64) from the saved parameter, as PEFT builds them."""
    rows, b = block_size(ctx, key)
    vec = ctx.get64(key)
    if ctx.config.get("coft"):
        eps = float(ctx.config.get("eps", 6e-5)) / math.sqrt(rows)
        norm = skew(vec, b).flatten(1).norm(dim=1, keepdim=True)
        vec = torch.where(norm <= eps, vec, vec * (eps / norm))
    blocks = cayley(skew(vec, b), bool(ctx.config.get("use_cayley_neumann", True)),
                    int(ctx.config.get("num_cayley_neumann_terms", 5)))
    return blocks.expand(n_blocks, b, b) if rows == 1 else blocks


def _module(ctx: Adapter, bs: Checkpoint | None, name: str, keys: dict[str, str]) -> Delta:
    assert bs is not None  # NEEDS_BASE
    if "oft_embedding_R" in keys:
        raise UnsupportedError(f"{ctx.source}: {keys['oft_embedding_R']}: OFT on "
                               "embedding layers is not supported")
    key = keys["oft_R"]
    shape = bs.canonical_shape(name, None)
    rows, b = block_size(ctx, key)
    n_blocks = shape[1] // b
    if n_blocks * b != shape[1] or (rows != 1 and rows != n_blocks) or \
            (rows == 1 and not ctx.config.get("block_share") and n_blocks != 1):
        raise ShapeError(f"{ctx.source}: {key} ({rows} block(s) of {b}×{b}) does not fit the "
                         f"base's {shape} weight of module {name!r}")
    base = bs.oriented(name, shape, None)

    def load() -> torch.Tensor:
        w = base().to(torch.float64).reshape(shape[0], n_blocks, b)
        rot = rotation_blocks(ctx, key, n_blocks) - torch.eye(b, dtype=torch.float64)
        return torch.einsum("onb,ncb->onc", w, rot).reshape(shape)  # W·(Rᵀ − I), block by block

    return _delta.dense(name, shape, load, method="oft", source=ctx.source, base=base,
                        bias=peft_extras.module_bias(ctx, name, shape[0]))
