r"""``verify-merge``: does a merged checkpoint hold its adapter?

For every module the adapter targets, with W = BASE, ΔW the adapter's update (any adapter type
:func:`deltaspec.loaders.load` reads, scales applied) and M = MERGED, all read one module at a
time and summed over float64 row blocks:

- the residual  r = ‖M − (W + ΔW)‖_F / ‖ΔW‖_F;
- the least-squares scale  c = ⟨M − W, ΔW⟩ / ‖ΔW‖²_F  and its residual
  r_c = ‖M − W − c·ΔW‖_F / ‖ΔW‖_F (the common α/r mistake merges c·ΔW);
- **the rounding bound** of M's dtype, of unit roundoff u = 2^−p (bfloat16 2^−8, float16 2^−11,
  float32 2^−24, float64 2^−53). A merge that forms ΔW, rounds it to the dtype (PEFT's order for a
  narrow base) and then rounds the sum moves each entry by at most u·|ΔWᵢⱼ| + u·|Wᵢⱼ + ΔWᵢⱼ|
  (round-to-nearest: |round(x) − x| ≤ ½ ulp(x) ≤ u·|x|, :mod:`deltaspec.metrics.health`), so by
  the triangle inequality in the Frobenius norm

  .. math::  r ≤ b(1) \quad\text{with}\quad
     b(c) = u·\bigl(‖W + cΔW‖_F / ‖ΔW‖_F + |c|\bigr) + ε·|c|,

  where ε = 2^−17 (128 float32 ulps) allows for the merge's own float32 arithmetic in forming ΔW
  (B·A·s summed over the rank). ‖W + cΔW‖²_F = ‖W‖² + 2c⟨W, ΔW⟩ + c²‖ΔW‖², from the same sums.

Verdicts, in this order: **merged** (r ≤ b(1)); **not merged** (M equals W bit for bit, or
‖M − W‖_F/‖ΔW‖_F ≤ b(0): the base's rounding alone explains M); **merged with scale c**
(r_c ≤ b(c)); **other**. A module whose ΔW is exactly zero holds when M equals W up to rounding
W to M's dtype, ‖M − W‖_F ≤ u·‖W‖_F ("merged (ΔW = 0)"), else "other". A module holds only
with the verdict "merged" (or "merged (ΔW = 0)").

Bad input (:class:`~deltaspec.errors.DeltaspecError`, one line): MERGED not a full checkpoint;
MERGED and BASE with different shapes or 2-D tensor sets (the first named); an adapter module
missing from MERGED; a quantised MERGED (integer weights: int8, packed 4-bit); NaN/Inf.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from deltaspec.delta import Delta
from deltaspec.engine.kernels import Operand
from deltaspec.engine.spectrum import operand
from deltaspec.errors import CheckpointError, ShapeError, UnsupportedError
from deltaspec.metrics.health import FORMATS, unit_roundoff
from deltaspec.names import match_key
from deltaspec.options import Options

if TYPE_CHECKING:
    from deltaspec.loaders import Deltas

ARITHMETIC = 2.0**-17  # ε: the merge's float32 arithmetic in forming ΔW, relative to ‖c·ΔW‖
HELD_ZERO = "merged (ΔW = 0)"  # a zero update and M = W
VERDICTS = ("merged", HELD_ZERO, "not merged", "merged with scale c", "other")
HOLDS = ("merged", HELD_ZERO)
COLUMNS = ("module", "shape", "dtype", "residual", "bound", "scale", "scale_residual", "verdict",
           "holds")
_QUANTISED = "integer or bool tensor"  # the full loader's reason for an integer 2-D tensor
_ONE_SIDED = {"not in the base checkpoint": "MERGED has {key!r}, which BASE does not",
              "only in the base checkpoint": "BASE has {key!r}, which MERGED does not"}


@dataclass(frozen=True)
class ModuleCheck:
    """One targeted module's result (see the module text for each quantity)."""

    module: str
    shape: str
    dtype: str
    residual: float
    bound: float
    scale: float
    scale_residual: float
    verdict: str
    holds: bool


@dataclass
class Sums:
    """The float64 sums over row blocks that every quantity comes from (D = M − W, A = ΔW)."""

    dd: float = 0.0  # ‖D‖²
    aa: float = 0.0  # ‖A‖²
    da: float = 0.0  # ⟨D, A⟩
    rr: float = 0.0  # ‖D − A‖²
    ww: float = 0.0  # ‖W‖²
    wa: float = 0.0  # ⟨W, A⟩
    same: bool = True  # M equals W in every entry

    def add(self, m: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> None:
        """Add one row block (float64) of M, W and ΔW: inner products by BLAS dot (one read
        each); ‖D − A‖² from D − A itself, not from ‖D‖² − 2⟨D, A⟩ + ‖A‖², which cancels."""
        m, w, a = m.reshape(-1), w.reshape(-1), a.reshape(-1)
        d = m - w
        r = d - a
        self.dd += float(torch.dot(d, d))
        self.aa += float(torch.dot(a, a))
        self.da += float(torch.dot(d, a))
        self.rr += float(torch.dot(r, r))
        self.ww += float(torch.dot(w, w))
        self.wa += float(torch.dot(w, a))
        self.same = self.same and not bool(d.any())


def bound(s: Sums, c: float, u: float) -> float:
    """b(c) = u·(‖W + cΔW‖_F/‖ΔW‖_F + |c|) + ε·|c| from the sums (see the module text).

    >>> bound(Sums(aa=1.0, ww=100.0), 1.0, 2.0**-8) == 2.0**-8 * (101**0.5 + 1) + 2.0**-17
    True
    """
    x = math.sqrt(max(s.ww + 2 * c * s.wa + c * c * s.aa, 0.0) / s.aa)
    return u * (x + abs(c)) + ARITHMETIC * abs(c)


def judge(s: Sums, u: float) -> tuple[float, float, float, float, str]:
    """(residual r, bound b(1), scale c, its residual r_c, verdict) of one module's sums in a
    dtype of unit roundoff ``u``.

    >>> judge(Sums(dd=4.0, aa=1.0, da=2.0, rr=1.0, ww=1.0, same=False), 2.0**-24)[2:]
    (2.0, 0.0, 'merged with scale 2')
    >>> judge(Sums(aa=1.0, rr=1.0, ww=1.0), 2.0**-24)[4]
    'not merged'
    """
    if s.aa == 0:  # nothing to merge: M must be W, up to rounding W to M's dtype
        held = s.same or math.sqrt(s.dd) <= u * math.sqrt(s.ww)
        return math.nan, math.nan, math.nan, math.nan, HELD_ZERO if held else "other"
    r, b1, c = math.sqrt(s.rr / s.aa), bound(s, 1.0, u), s.da / s.aa
    r_c = math.sqrt(max(s.dd - s.da * c, 0.0) / s.aa)
    if r <= b1:
        verdict = "merged"
    elif s.same or math.sqrt(s.dd / s.aa) <= bound(s, 0.0, u):
        verdict = "not merged"
    else:
        verdict = f"merged with scale {c:.6g}" if r_c <= bound(s, c, u) else "other"
    return r, b1, c, r_c, verdict


def check_module(name: str, adapter: Delta, merged: Delta) -> ModuleCheck:
    """Verify one module: ``merged`` is the full loader's Delta of MERGED − BASE (its ``parts``
    give M and W as stored), ``adapter`` the adapter's ΔW."""
    if adapter.shape != merged.shape:
        raise ShapeError(f"{merged.label}: shape {merged.shape} in MERGED but the adapter's "
                         f"update of {name!r} has {adapter.shape}")
    assert merged.parts is not None
    m_t, w_t = merged.parts()
    dtype = str(m_t.dtype).removeprefix("torch.")
    if dtype not in FORMATS:
        raise UnsupportedError(f"{merged.label}: MERGED stores it as {dtype}; verify-merge knows "
                               f"the rounding of {', '.join(FORMATS)}")
    cpu = torch.device("cpu")
    m_op = Operand(merged.shape, cpu, f"{merged.label} (MERGED)", dense=[(1.0, m_t)])
    w_op = Operand(merged.shape, cpu, f"{merged.label} (BASE)", dense=[(1.0, w_t)])
    a_op = operand(adapter, cpu)
    s = Sums()
    step = max(1, m_op.step(True) // 3)
    for lo in range(0, merged.shape[0], step):
        hi = min(lo + step, merged.shape[0])
        s.add(m_op.rows(lo, hi), w_op.rows(lo, hi), a_op.rows(lo, hi))
    if not all(math.isfinite(v) for v in (s.dd, s.aa, s.rr, s.ww)):
        for op in (m_op, w_op, a_op):
            op.check_finite()
    r, b1, c, r_c, verdict = judge(s, unit_roundoff(dtype))
    return ModuleCheck(name, f"{merged.shape[0]}×{merged.shape[1]}", dtype, r, b1, c, r_c, verdict,
                       verdict in HOLDS)


def pair(adapter: Mapping[str, Delta], merged: Mapping[str, Delta],
         skipped: list[tuple[str, str]]) -> Iterator[tuple[str, Delta, Delta]]:
    """(module, adapter Delta, MERGED − BASE Delta) for every adapter module, after the checks
    on MERGED and BASE as a pair (quantised, one-sided tensors, missing targets)."""
    for key, why in skipped:
        if why.startswith(_QUANTISED):
            raise UnsupportedError(f"MERGED: tensor {key!r} holds integers (a quantised checkpoint, "
                                   "int8 or packed 4-bit): verify-merge compares float weights; "
                                   "check a merge into the unquantised base")
        if why in _ONE_SIDED:
            raise CheckpointError("MERGED and BASE hold different tensors: "
                                  + _ONE_SIDED[why].format(key=key))
    by_key = {match_key(n): d for n, d in merged.items()}
    for name, d in adapter.items():
        m = by_key.get(match_key(name))
        if m is None:
            raise CheckpointError(f"{d.label}: the adapter's module {name!r} is not in MERGED "
                                  f"(e.g. MERGED has {', '.join(list(merged)[:2])})")
        yield name, d, m


def verify_merge(merged: Any, adapter: Any, base: Any,
                 opts: Options | None = None) -> list[ModuleCheck]:
    """Check every module of ``adapter`` in ``merged`` against ``base`` (each a folder, a Hub id
    or a live object; ``opts``: the load fields of :class:`Options`). One result per module, in
    the adapter's order, each module read and checked before the next is read."""
    opts = opts or Options()
    m_deltas = _load(merged, base, opts)
    if m_deltas.format != "full":
        raise UnsupportedError(f"MERGED is a {m_deltas.format} checkpoint, not a merged model: "
                               "give the merged model's folder (or Hub id) first")
    a_deltas = _load(adapter, base, opts)
    return [check_module(name, a, m) for name, a, m in pair(a_deltas, m_deltas,
                                                              list(m_deltas.skipped))]


def _load(path: Any, base: Any, opts: Options) -> Deltas:
    """The one call to the loaders: every adapter type, sharded checkpoints, Hub ids, live
    objects; the base is the one given (never discovered)."""
    import dataclasses

    from deltaspec.loaders.registry import load_side
    from deltaspec.plan import side

    opts = dataclasses.replace(opts, discover_base=False)
    return load_side(side(path, base, opts), opts)


def records(checks: list[ModuleCheck]) -> list[dict[str, Any]]:
    """The results as rows of :data:`COLUMNS`."""
    return [asdict(c) for c in checks]


__all__ = ["ARITHMETIC", "COLUMNS", "HOLDS", "VERDICTS", "ModuleCheck", "Sums", "bound", "check_module",
           "judge", "pair", "records", "verify_merge"]
