r"""Rank policies: how many singular directions of an update to keep — pure functions of σ.

One declaration table, :data:`POLICIES`; a policy string (the CLI's ``--rank``) is parsed by
:func:`parse_policy` into a :class:`Policy`, whose :meth:`Policy.rank` applies the rule, the
``min_rank``/``max_rank`` clamps and the numerical-rank cap (a direction whose σ is float32
rounding of σ₁ is never kept: :func:`deltaspec.metrics.spectral.numerical_rank`).

- ``k`` — a fixed rank (``16`` or ``k:16``).
- ``energy`` — the least k with :math:`\sum_{i\le k}\sigma_i^2 \ge \tau\sum_i\sigma_i^2`
  (``0.9`` or ``energy:0.9``, τ in (0, 1]). PEFT 0.21's rule (``convert_to_lora`` with a float
  rank: ``searchsorted`` of τ·total in the cumulative energy, plus one), taken here in float64.
- ``gd`` — Gavish & Donoho's optimal hard threshold with unknown noise: keep σ > ω(β)·median(σ),
  ω(β) = λ*(β)/√μ_β, β = min(m, n)/max(m, n) (Gavish & Donoho 2014, "The optimal hard threshold
  for singular values is 4/√3", IEEE Trans. Inf. Theory 60(8), eqs. (11) and (4)); the same rank
  as the ``optht`` package.
- ``mp`` — the Marchenko–Pastur bulk edge: keep σ > (1 + √β)·√n·σ̂, the largest singular value
  pure noise of level σ̂ reaches (Marchenko & Pastur 1967), with the noise level estimated from
  the bulk by its median, σ̂ = median(σ)/√(n·μ_β) (Gavish & Donoho 2014, §III.A), n = max(m, n),
  μ_β the median of the Marchenko–Pastur law of ratio β. It keeps more than ``gd``: the edge
  (1 + √β)/√μ_β lies below ω(β).

The median runs over all min(m, n) values (exact zeros included), as ``optht`` takes them: an
update of exactly low rank has median 0, and both thresholds then keep its numerical rank.

>>> parse_policy("0.9").kind, parse_policy("gd").kind, parse_policy("16").value
('energy', 'gd', 16)
>>> parse_policy("energy:0.5", max_rank=1).rank([3.0, 2.0, 1.0], (3, 3))
1
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deltaspec.errors import UsageError
from deltaspec.metrics.spectral import Values, _scaled, descending, numerical_rank


def fixed_rank(values: Values, shape: tuple[int, int], k: float) -> int:
    """The rank ``k`` itself (the clamps and the numerical-rank cap apply after).

    >>> fixed_rank([1.0, 0.5], (2, 2), 8)
    8
    """
    return int(k)


def energy_rank_peft(values: Values, shape: tuple[int, int], tau: float) -> int:
    r"""PEFT's energy rule: the least k with :math:`\sum_{i\le k}\sigma_i^2 \ge \tau\sum\sigma_i^2`
    (``searchsorted`` of τ·total in the cumulative energy, left side, plus one); 0 for ΔW = 0.

    >>> energy_rank_peft([3.0, 1.0, 1.0], (3, 3), 0.9), energy_rank_peft([3.0, 1.0], (2, 2), 1.0)
    (2, 2)
    """
    s = _scaled(values)[0]
    if not s.size:
        return 0
    cs = np.cumsum(s * s)
    return min(int(np.searchsorted(cs, tau * cs[-1], side="left")) + 1, s.size)


@functools.lru_cache(maxsize=256)
def mp_median(beta: float) -> float:
    r"""The median μ_β of the Marchenko–Pastur law of ratio β ∈ (0, 1] (unit variance): the
    eigenvalue x with :math:`\int_a^x f_\beta = 1/2`, :math:`f_\beta(x) = \sqrt{(b-x)(x-a)}/
    (2\pi\beta x)`, a, b = (1 ∓ √β)². The substitution x = a + (b − a)(1 − cos t)/2 makes the
    integrand smooth; a 64-point Gauss–Legendre rule and bisection on t give it to ~1e-13.

    >>> round(mp_median(1.0), 4)
    0.6528
    """
    if not 0 < beta <= 1:
        raise UsageError(f"aspect ratio β must be in (0, 1], not {beta}")
    a, b = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    nodes, weights = np.polynomial.legendre.leggauss(64)

    def cdf(t: float) -> float:
        u = (nodes + 1) * (t / 2)
        x = a + (b - a) * (1 - np.cos(u)) / 2
        g = ((b - a) / 2) ** 2 * np.sin(u) ** 2 / (2 * math.pi * beta * x)
        return float((weights * g).sum() * (t / 2))

    lo, hi = 0.0, math.pi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.5 else (lo, mid)
    t = (lo + hi) / 2
    return a + (b - a) * (1 - math.cos(t)) / 2


def aspect(shape: tuple[int, int]) -> float:
    """β = min(m, n)/max(m, n) of an (m, n) matrix.

    >>> aspect((64, 16))
    0.25
    """
    return min(shape) / max(shape)


def gd_coefficient(beta: float) -> float:
    r"""ω(β) = λ*(β)/√μ_β, :math:`\lambda^*(\beta) = \sqrt{2(\beta+1) + 8\beta/(\beta+1+
    \sqrt{\beta^2+14\beta+1})}` (Gavish & Donoho 2014, eq. (11)): the threshold over median σ.

    >>> round(gd_coefficient(1.0), 3)
    2.858
    """
    lam = math.sqrt(2 * (beta + 1) + 8 * beta / (beta + 1 + math.sqrt(beta**2 + 14 * beta + 1)))
    return lam / math.sqrt(mp_median(beta))


def mp_coefficient(beta: float) -> float:
    """The Marchenko–Pastur bulk edge over median σ: (1 + √β)/√μ_β.

    >>> round(mp_coefficient(1.0), 3)
    2.475
    """
    return (1 + math.sqrt(beta)) / math.sqrt(mp_median(beta))


def _above(values: Values, cutoff: float) -> int:
    return int((descending(values) > cutoff).sum())


def gd_rank(values: Values, shape: tuple[int, int], _: float | None = None) -> int:
    """#{σ > ω(β)·median σ} (Gavish–Donoho, unknown noise), capped at the numerical rank; the
    median is taken over the min(m, n) values (missing ones are exact zeros).

    >>> gd_rank([10.0, 1.0, 0.9, 1.1, 1.0], (5, 5))
    1
    """
    s = _padded(values, shape)
    cut = gd_coefficient(aspect(shape)) * float(np.median(s)) if s.size else 0.0
    return min(_above(s, cut), numerical_rank(s, shape))


def mp_rank(values: Values, shape: tuple[int, int], _: float | None = None) -> int:
    """#{σ > (1 + √β)·median σ/√μ_β} (the Marchenko–Pastur edge, noise from the bulk's median),
    capped at the numerical rank.

    >>> mp_rank([10.0, 2.8, 0.9, 1.1, 1.0], (5, 5)), gd_rank([10.0, 2.8, 0.9, 1.1, 1.0], (5, 5))
    (2, 1)
    """
    s = _padded(values, shape)
    cut = mp_coefficient(aspect(shape)) * float(np.median(s)) if s.size else 0.0
    return min(_above(s, cut), numerical_rank(s, shape))


def noise_rank(values: Values, shape: tuple[int, int]) -> int:
    """σ above the Gavish–Donoho threshold (the ``noise_rank`` metric; :func:`gd_rank`).

    >>> noise_rank([5.0, 1.0, 1.0, 1.0], (4, 4))
    1
    """
    return gd_rank(values, shape)


def _padded(values: Values, shape: tuple[int, int]) -> np.ndarray:
    s = descending(values)
    k = min(shape)
    return np.concatenate([s, np.zeros(k - s.size)]) if s.size < k else s


@dataclass(frozen=True)
class PolicyKind:
    """One rank policy: ``rule(σ, shape, value) -> k`` and what its value is (none for gd/mp)."""

    name: str
    rule: Callable[[Values, tuple[int, int], float], int]
    value: str  # "int", "fraction" or "" (no value)
    description: str


POLICIES: dict[str, PolicyKind] = {p.name: p for p in (
    PolicyKind("k", fixed_rank, "int", "a fixed rank k (`16`, `k:16`)"),
    PolicyKind("energy", energy_rank_peft, "fraction",
               "least k with Σ_{i≤k}σ² ≥ τΣσ², τ in (0, 1] (`0.9`, `energy:0.9`; PEFT's rule)"),
    PolicyKind("gd", gd_rank, "", "Gavish–Donoho optimal hard threshold, unknown noise (`gd`)"),
    PolicyKind("mp", mp_rank, "", "Marchenko–Pastur bulk edge, noise from the median (`mp`)"),
)}
"""Every rank policy by name (the one declaration)."""


@dataclass(frozen=True)
class Policy:
    """A parsed rank policy with its clamps."""

    kind: str
    value: float | int | None = None
    min_rank: int | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        _check_clamps(self.min_rank, self.max_rank)

    @property
    def text(self) -> str:
        """The policy as a string :func:`parse_policy` reads back.

        >>> parse_policy("0.9").text, parse_policy("16").text
        ('energy:0.9', '16')
        """
        if self.kind == "k":
            return str(self.value)
        return f"{self.kind}:{self.value}" if self.value is not None else self.kind

    def rank(self, values: Values, shape: tuple[int, int]) -> int:
        """The rank to keep: the rule, then ``min_rank``/``max_rank``, then capped at the
        numerical rank (0 for ΔW = 0).

        >>> Policy("k", 4).rank([2.0, 1.0, 0.0], (3, 3)), Policy("gd", min_rank=2).rank([5.0, 1.0], (2, 2))
        (2, 2)
        """
        k = POLICIES[self.kind].rule(values, shape, self.value if self.value is not None else 0.0)
        if self.min_rank is not None:
            k = max(k, self.min_rank)
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return min(k, numerical_rank(values, shape))


def _check_clamps(lo: int | None, hi: int | None) -> None:
    for name, v in (("min_rank", lo), ("max_rank", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UsageError(f"{name} must be a positive integer, not {v!r}")
    if lo is not None and hi is not None and lo > hi:
        raise UsageError(f"min_rank {lo} is above max_rank {hi}")


def parse_policy(text: str | float | Policy, min_rank: int | None = None,
                 max_rank: int | None = None) -> Policy:
    """A rank policy from its spelling: an integer k (``16``), an energy fraction (``0.9``,
    ``energy:0.9``), ``k:16``, ``gd`` or ``mp``; a bad one is a one-line :class:`UsageError`.

    >>> parse_policy("mp", max_rank=8)
    Policy(kind='mp', value=None, min_rank=None, max_rank=8)
    >>> parse_policy(0.95).value
    0.95
    """
    if isinstance(text, Policy):
        return Policy(text.kind, text.value, min_rank or text.min_rank, max_rank or text.max_rank)
    if isinstance(text, bool):
        raise UsageError(f"rank policy {text!r}: use an integer k, a fraction τ, gd or mp")
    raw = str(text).strip().lower()
    name, sep, value = raw.partition(":")
    if not sep:
        name, value = ("k", raw) if _is_int(raw) else ("energy", raw) if _is_number(raw) \
            else (raw, "")
    if name not in POLICIES:
        raise UsageError(f"rank policy {text!r}: unknown (use an integer k, a fraction τ in "
                         f"(0, 1], or one of {', '.join(POLICIES)})")
    return Policy(name, _value(POLICIES[name], value, text), min_rank, max_rank)


def _value(kind: PolicyKind, value: str, text: object) -> float | int | None:
    if kind.value == "":
        if value:
            raise UsageError(f"rank policy {text!r}: {kind.name} takes no value")
        return None
    if kind.value == "int":
        if not _is_int(value) or int(value) < 1:
            raise UsageError(f"rank policy {text!r}: the rank must be a positive integer")
        return int(value)
    tau = float(value) if _is_number(value) else math.nan
    if not 0 < tau <= 1:
        raise UsageError(f"rank policy {text!r}: the energy fraction τ must be in (0, 1]")
    return tau


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


__all__ = ["POLICIES", "Policy", "PolicyKind", "aspect", "energy_rank_peft", "fixed_rank",
           "gd_coefficient", "gd_rank", "mp_coefficient", "mp_median", "mp_rank", "noise_rank",
           "parse_policy"]
