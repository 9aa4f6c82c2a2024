r"""Health of an update: did it train, and what survives when W + ΔW is stored in a narrow float.

Pure functions: of the singular values (:func:`untrained`), of float64 tensors element by element
(:func:`ulp`, :func:`round_to`, :func:`merge_block`), and of the sums the engine accumulates over
blocks of W and ΔW (:func:`lost_share`, :func:`merge_error`; the loop is
:func:`deltaspec.engine.health.merge_rounding`).

**ulp in a float format** of precision p (significand bits, the implicit one included: 8 for
bfloat16, 11 for float16, 24 for float32) and smallest normal exponent e_min (−126, −14, −126):

.. math::  \operatorname{ulp}(x) = 2^{\max(\lfloor \log_2 |x| \rfloor,\ e_{min}) - p + 1},
   \qquad \operatorname{ulp}(0) = 2^{e_{min} - p + 1}

— the spacing of the format's numbers in the binade [2^e, 2^{e+1}) holding |x| (subnormals share
the smallest normal binade's spacing). Round-to-nearest moves x by at most ½ ulp(x), so an entry
with |ΔWᵢⱼ| < ½ ulp(Wᵢⱼ) of a representable Wᵢⱼ is rounded back to Wᵢⱼ: it is *lost* when W + ΔW
is stored in the format. Boundary cases: an entry with |ΔWᵢⱼ| = ½ ulp exactly (a tie) is *not*
counted (round-half-to-even keeps it when Wᵢⱼ's last bit is odd, drops it when even); at a power
of two Wᵢⱼ = ±2^e the numbers below |Wᵢⱼ| are spaced ½ ulp, so a ΔWᵢⱼ toward zero with
¼ ulp < |ΔWᵢⱼ| < ½ ulp survives though it is counted lost — ``lost_in_bf16`` counts against
the spacing above |W|, by this definition, not by simulating the rounding (``bf16_merge_error``
does simulate it: :func:`round_to`).

No pandas, matplotlib or click here; torch is imported in the functions that take tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deltaspec.options import MERGE_DTYPES

if TYPE_CHECKING:
    import torch

# dtype → (precision p in bits with the implicit one, smallest normal exponent, largest finite)
FORMATS: dict[str, tuple[int, int, float]] = {
    "bfloat16": (8, -126, (2 - 2**-7) * 2.0**127),
    "float16": (11, -14, 65504.0),
    "float32": (24, -126, (2 - 2**-23) * 2.0**127),
    "float64": (53, -1022, 1.7976931348623157e308),
}


def untrained(values: Sequence[float]) -> int:
    """1 when every singular value is exactly zero — ΔW ≡ 0: a LoRA module whose B (or A) is
    all zeros (never trained), or a full fine-tune's tensor equal to the base's (frozen) — else 0.

    >>> untrained([0.0, 0.0]), untrained([1e-30, 0.0]), untrained([])
    (1, 0, 1)
    """
    return int(all(float(s) == 0.0 for s in values))


def unit_roundoff(dtype: str) -> float:
    """u = 2^−p: round-to-nearest moves a normal x by at most u·|x| (½ ulp(x) ≤ u·|x|).

    >>> unit_roundoff("bfloat16"), unit_roundoff("float16")
    (0.00390625, 0.00048828125)
    """
    return 2.0 ** -_format(dtype)[0]


def ulp(x: torch.Tensor, dtype: str = "bfloat16") -> torch.Tensor:
    """The spacing of ``dtype`` numbers at each entry of float64 ``x`` (see the module text),
    read off x's exponent bits: no logarithm, no ``ldexp`` (both cost several passes).

    >>> import torch
    >>> ulp(torch.tensor([1.0, 1.5, -2.0, 0.0], dtype=torch.float64)).tolist()[:3]
    [0.0078125, 0.0078125, 0.015625]
    >>> ulp(torch.tensor([0.0, 1e-40], dtype=torch.float64)).tolist() == [2.0**-133] * 2
    True
    """
    return (_exponent(x, dtype) << 52).view(x.dtype)


def _exponent(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The biased float64 exponent of ulp(x): max(E(x), e_min + 1023) − (p − 1), E the stored
    exponent field (0 for zero and float64 subnormals: the clamp gives them e_min)."""
    import torch

    p, e_min, _ = _format(dtype)
    if x.dtype != torch.float64:
        raise TypeError("ulp/round_to take float64 tensors")
    e = (x.view(torch.int64) >> 52) & 0x7FF
    return e.clamp_(min=e_min + 1023).sub_(p - 1)


def round_to(x: torch.Tensor, dtype: str = "bfloat16") -> torch.Tensor:
    """float64 ``x`` rounded once to ``dtype`` (nearest, ties to even; ±inf past the largest
    finite), returned in float64: round(x·2^−k)·2^k with 2^k = ulp(x), exact (power-of-two
    scalings). (torch's own ``x.to(torch.bfloat16)`` from float64 rounds twice, through float32.)

    >>> import torch
    >>> x = torch.tensor([1 + 2**-8 + 2**-40, 1 + 2**-8, 1 + 3 * 2**-8, 3.4e38], dtype=torch.float64)
    >>> round_to(x).tolist()
    [1.0078125, 1.0, 1.015625, inf]
    """
    import torch

    e = _exponent(x, dtype)
    inv = ((2046 - e) << 52).view(torch.float64)  # 1/ulp(x), also a power of two
    r = torch.round(x * inv).mul_((e << 52).view(torch.float64))  # round: half to even
    top = _format(dtype)[2]
    if r.numel() and float(r.abs().max()) > top:
        r = torch.where(r.abs() > top, r * math.inf, r)
    return r


def merge_block(w: torch.Tensor, dw: torch.Tensor, dtype: str = "bfloat16") -> tuple[int, float, float]:
    """One block's (entries lost, ‖round(W + ΔW) − W − ΔW‖²_F, ‖ΔW‖²_F), W and ΔW in float64:
    the terms :func:`lost_share` and :func:`merge_error` take, summed over blocks.

    >>> import torch
    >>> w = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    >>> dw = torch.tensor([[2.0**-9, 2.0**-6 + 2.0**-9]], dtype=torch.float64)
    >>> lost, err2, d2 = merge_block(w, dw)
    >>> lost, err2 == 2 * 2.0**-18, d2 == 2.0**-18 + (2.0**-6 + 2.0**-9) ** 2
    (1, True, True)
    """
    lost = int((dw.abs().mul_(2) < ulp(w, dtype)).sum())
    x = w + dw
    err2 = float(round_to(x, dtype).sub_(x).square_().sum())
    return lost, err2, float(dw.square().sum())


def lost_share(lost: int, entries: int) -> float:
    """``lost_in_bf16``: the share of ΔW's entries with |ΔWᵢⱼ| < ½ ulp(Wᵢⱼ) (NaN for no entries).

    >>> lost_share(1, 4), lost_share(0, 0)
    (0.25, nan)
    """
    return lost / entries if entries else math.nan


def merge_error(err2: float, delta2: float) -> float:
    """``bf16_merge_error`` = ‖round(W + ΔW) − W − ΔW‖_F / ‖ΔW‖_F from the two squared norms
    (NaN for ΔW = 0): 1 when the merge in the narrow format loses the whole update.

    >>> round(merge_error(2 * 2.0**-18, 2.0**-18 + (2.0**-6 + 2.0**-9) ** 2), 4)
    0.1562
    >>> merge_error(1.0, 0.0)
    nan
    """
    return math.sqrt(err2 / delta2) if delta2 > 0 else math.nan


def untrained_note(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The one line ``analyze`` ends with when some modules of ``rows`` (each with ``untrained``,
    ``method`` and ``route``) have ΔW ≡ 0, worded for what they are; None when none has.

    >>> r = [{"untrained": 1, "method": "lora", "route": "factored"}] * 2
    >>> untrained_note(r + [{"untrained": 0, "method": "lora", "route": "factored"}])
    '2 of 3 modules have B = 0: this adapter never trained there'
    >>> untrained_note([{"untrained": 1, "method": "full", "route": "zero"}])
    '1 of 1 modules are bit-identical to the base: frozen in this fine-tune'
    """
    zero = [r for r in rows if r.get("untrained") == 1]
    if not zero:
        return None
    head = f"{len(zero)} of {len(rows)} modules"
    if all(r.get("method") == "full" for r in zero):
        return f"{head} are bit-identical to the base: frozen in this fine-tune"
    if all(r.get("route") == "factored" or r.get("method") == "lora" for r in zero):
        return f"{head} have B = 0: this adapter never trained there"
    return f"{head} have ΔW = 0 (B = 0, or bit-identical to the base): never trained there"


def _format(dtype: str) -> tuple[int, int, float]:
    try:
        return FORMATS[dtype]
    except KeyError:
        from deltaspec.errors import UsageError

        raise UsageError(f"merge dtype {dtype!r}: use one of {', '.join(FORMATS)}") from None


__all__ = ["FORMATS", "MERGE_DTYPES", "lost_share", "merge_block", "merge_error", "round_to",
           "ulp", "unit_roundoff", "untrained", "untrained_note"]
