"""`Delta`: the one type every loader yields — a weight update ΔW, read lazily, in one of three
structures: factored (ΔW = B·A), Kronecker (ΔW = W₁ ⊗ W₂, each factor dense or itself B·A) or dense.

A Delta knows its name, its canonical shape (out, in) and how to produce its tensors; nothing is
read from disk until :meth:`Delta.factors`, :meth:`Delta.kron_factors` or :meth:`Delta.dense` is
called. Structured deltas keep every scale folded into the first factor (``B``, ``W₁``) so that
``ΔW = B @ A`` (``torch.kron(W₁, W₂)``) exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from deltaspec.errors import CheckpointError, DeltaspecError, NumericalError

Factors = tuple[torch.Tensor, torch.Tensor]
# One factor of a Kronecker delta: a dense matrix, or (B, A) with the factor = B @ A.
KronFactor = torch.Tensor | Factors


# Float formats torch stores but cannot compute with (isfinite, matmul): read as float32, exactly.
_UPCAST = tuple(getattr(torch, n) for n in (
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
    if hasattr(torch, n))


def weights_dtype(t: torch.Tensor, what: str, *, integers: bool = False,
                  error: type[DeltaspecError] = CheckpointError) -> torch.Tensor:
    """The dtype gate: ``t`` as a real float tensor, or a one-line ``error`` naming ``what``.

    float8 tensors are up-cast to float32 (exact); complex tensors are refused (their imaginary
    part would be dropped silently); integer and bool tensors are refused where weights are
    expected (``integers=True`` lets them through, exact in float64).
    """
    if t.dtype in _UPCAST:
        return t.to(torch.float32)
    if t.is_complex():
        raise error(f"{what}: holds {str(t.dtype).removeprefix('torch.')} values; deltaspec reads "
                    "real weights (a complex update has no real singular-value spectrum here)")
    if not t.is_floating_point() and not integers:
        raise error(f"{what}: holds {str(t.dtype).removeprefix('torch.')} values where weights "
                    "(floating point) are expected")
    return t


def check_finite(t: torch.Tensor, what: str) -> torch.Tensor:
    """Return ``t`` unchanged, or raise :class:`NumericalError` naming ``what`` if it has NaN/Inf."""
    if t.dtype in _UPCAST:
        t = t.to(torch.float32)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        n_bad = int((~torch.isfinite(t)).sum())
        raise NumericalError(f"{what}: {n_bad} NaN/Inf value(s) in a tensor of shape {tuple(t.shape)}")
    return t


@dataclass(frozen=True, eq=False)
class Delta:
    """A weight update ΔW of one module, in canonical (out, in) orientation.

    Attributes:
        name: canonical module path, e.g. ``model.layers.0.self_attn.q_proj``.
        shape: (out, in) of ΔW.
        rank_bound: structural rank bound: Σ r for a factored delta, the product of the factors'
            bounds for a Kronecker one, min(out, in) for a dense one.
        method: where it came from: ``lora``, ``multilora``, ``dora``, ``full``, ``modules_to_save``.
        source: the file the tensors are read from (used in error messages).
        base: optional thunk returning the base weight W0 in (out, in) orientation.
        bias: optional thunk returning the bias update (out,).
        parts: optional thunk of a dense delta read as a difference: (tuned, base) tensors as
            stored (dtype unchanged, (out, in) orientation) with ΔW = tuned − base, so the engine
            can move bf16 as is and up-cast on the device.
    """

    name: str
    shape: tuple[int, int]
    rank_bound: int
    method: str
    source: str
    _factors: Callable[[], Factors] | None = field(default=None, repr=False)
    _dense: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    base: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    bias: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    parts: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)
    _kron: Callable[[], tuple[KronFactor, KronFactor]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self._factors, self._dense, self._kron)) != 1:
            raise ValueError("a Delta is exactly one of factored, Kronecker or dense")
        if 0 in self.shape:
            raise CheckpointError(f"{self.label}: update of shape {tuple(self.shape)} has an "
                                  "empty dimension")

    @property
    def is_kronecker(self) -> bool:
        """True when ΔW = W₁ ⊗ W₂ is kept as its two factors (never materialised)."""
        return self._kron is not None

    def kron_factors(self, dtype: torch.dtype = torch.float32) -> tuple[KronFactor, KronFactor]:
        """(W₁, W₂) with ΔW = torch.kron(W₁, W₂); each a matrix or a (B, A) pair. Kronecker only."""
        if self._kron is None:
            raise DeltaspecError(f"{self.label}: not a Kronecker delta")
        return tuple(_kron_factor(f, dtype, f"{self.label} (Kronecker factor {i + 1})")  # type: ignore[return-value]
                     for i, f in enumerate(self._kron()))

    @property
    def is_factored(self) -> bool:
        """True when ΔW = B @ A is kept as its factors (never materialised)."""
        return self._factors is not None

    @property
    def label(self) -> str:
        """``source:name``, the way error messages name this tensor."""
        return f"{self.source}: {self.name}"

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """(B, A) with ΔW = B @ A, B of shape (out, R), A of shape (R, in). Factored deltas only."""
        if self._factors is None:
            raise DeltaspecError(f"{self.label}: a dense delta has no factors")
        b, a = self._factors()
        b = weights_dtype(b, f"{self.label} (B factor)", integers=True)
        a = weights_dtype(a, f"{self.label} (A factor)", integers=True)
        return (
            check_finite(b.to(dtype), f"{self.label} (B factor)"),
            check_finite(a.to(dtype), f"{self.label} (A factor)"),
        )

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW as an (out, in) tensor. Factored deltas are multiplied out in float64 first."""
        if self._factors is not None:
            b, a = self.factors(torch.float64)
            return (b @ a).to(dtype)
        if self._kron is not None:
            check_bytes(8 * self.shape[0] * self.shape[1], f"{self.label}: the dense Kronecker product")
            w1, w2 = (as_matrix(f) for f in self.kron_factors(torch.float64))
            return torch.kron(w1, w2).to(dtype)
        assert self._dense is not None
        w = weights_dtype(self._dense(), self.label, integers=True)
        return check_finite(w.to(dtype), self.label)

def memory_budget() -> int:
    """Bytes one structured delta may allocate when it is expanded: half the machine's memory."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def check_bytes(nbytes: int, what: str) -> None:
    """A one-line :class:`CheckpointError` when ``what`` would allocate more than
    :func:`memory_budget` — estimated from config and shapes, before allocating."""
    if nbytes > memory_budget():
        raise CheckpointError(f"{what} would need {nbytes / 2**30:.1f} GiB (more than half this "
                              f"machine's memory, {memory_budget() / 2**30:.1f} GiB)")


def as_matrix(f: KronFactor) -> torch.Tensor:
    """A Kronecker factor as a matrix (a (B, A) pair multiplied out)."""
    return f[0] @ f[1] if isinstance(f, tuple) else f


def _kron_factor(f: KronFactor, dtype: torch.dtype, what: str) -> KronFactor:
    if isinstance(f, tuple):
        return check_finite(f[0].to(dtype), what), check_finite(f[1].to(dtype), what)
    return check_finite(f.to(dtype), what)


def factored(
    name: str, shape: tuple[int, int], load: Callable[[], Factors], *, method: str, source: str,
    rank: int, base: Callable[[], torch.Tensor] | None = None,
    bias: Callable[[], torch.Tensor] | None = None,
) -> Delta:
    """Build a factored Delta (ΔW = B @ A, scales folded into B)."""
    return Delta(name, shape, min(rank, *shape), method, source, _factors=load, base=base, bias=bias)


def dense(
    name: str, shape: tuple[int, int], load: Callable[[], torch.Tensor], *, method: str,
    source: str, base: Callable[[], torch.Tensor] | None = None,
    bias: Callable[[], torch.Tensor] | None = None,
    parts: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> Delta:
    """Build a dense Delta (``parts``: see :class:`Delta`)."""
    return Delta(name, shape, min(shape), method, source, _dense=load, base=base, bias=bias,
                 parts=parts)


def kronecker(
    name: str, shape: tuple[int, int], load: Callable[[], tuple[KronFactor, KronFactor]], *,
    method: str, source: str, rank: int, base: Callable[[], torch.Tensor] | None = None,
    bias: Callable[[], torch.Tensor] | None = None,
) -> Delta:
    """Build a Kronecker Delta: ΔW = W₁ ⊗ W₂ (scale folded into W₁), ``rank`` ≥ rank W₁ · rank W₂."""
    return Delta(name, shape, min(rank, *shape), method, source, _kron=load, base=base, bias=bias)
