r"""The metric table: every output metric declared once, with everything the rest of the package
knows about it — the function that computes it, which way is better, its bounds, whether it is an
integer, its plot label, its one-line definition and its default CI-gate tolerance.

Columns (:mod:`deltaspec.columns`), the gate's defaults (:mod:`deltaspec.gate.rules`), plot labels
(:mod:`deltaspec.plots`) and the README's metric table derive from :data:`METRICS`. A new spectral
metric is its function in :mod:`deltaspec.metrics.spectral` plus one :func:`spectral` row here
(tests/test_metrics.py checks every row's bounds, integer-ness and docstring example by itself;
the README's table is checked against this one).

>>> METRICS["normalized_entropy"].better, METRICS["normalized_entropy"].bounds
('higher', (0.0, 1.0))
>>> [m.name for m in group("pairwise")][:2]
['cosine', 'subspace_sim_left']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from deltaspec.metrics import base_relative as B
from deltaspec.metrics import health as H
from deltaspec.metrics import heavy_tail as HT
from deltaspec.metrics import pairwise as P
from deltaspec.metrics import ranks as RK
from deltaspec.metrics import spectral as S
from deltaspec.metrics.within import cap_k

GROUPS = ("spectral", "base_relative", "heavy_tail", "pairwise")
BETTER = ("higher", "lower", "neither")
INF = math.inf


@dataclass(frozen=True)
class GateDefault:
    """The CI gate's built-in tolerance: a change passes when ≤ abs + rel·|baseline| (only the
    change away from :attr:`Metric.better` fails; both ways when neither is better)."""

    abs: float = 0.0
    rel: float = 0.0


@dataclass(frozen=True)
class Metric:
    """One output metric (a column of ``analyze``; ``compare`` adds ``_a``/``_b`` per side).

    ``function`` computes it (each has a runnable example in its docstring): a spectral metric
    through :meth:`of_spectrum`; base-relative and pairwise metrics take the reduced quantities
    documented on their function.
    """

    name: str
    group: str
    function: Callable[..., float]
    label: str
    description: str
    better: str = "neither"
    bounds: tuple[float, float] = (0.0, INF)
    integer: bool = False
    gate: GateDefault | None = None
    takes_shape: bool = False  # spectral: function(σ, shape, ...) rather than function(σ, ...)
    params: tuple[tuple[str, float], ...] = ()  # spectral: keyword arguments of the function

    def __post_init__(self) -> None:
        if self.group not in GROUPS or self.better not in BETTER:
            raise ValueError(f"metric {self.name}: group {self.group!r} / better {self.better!r}")

    def of_spectrum(self, s: S.Values, shape: tuple[int, int]) -> float:
        """A spectral metric of the descending float64 values ``s`` of an (out, in) = ``shape`` ΔW.

        >>> METRICS["top1_share"].of_spectrum([3.0, 1.0], (2, 2))
        0.9
        """
        args = (s, shape) if self.takes_shape else (s,)
        return self.function(*args, **dict(self.params))

    @property
    def failing_direction(self) -> str:
        """The gate's direction for this metric: the change that fails ("down", "up" or "both")."""
        return {"higher": "down", "lower": "up", "neither": "both"}[self.better]


def spectral(name: str, function: Callable[..., float], label: str, description: str, *,
             better: str = "neither", bounds: tuple[float, float] = (0.0, INF), integer: bool = False,
             gate: GateDefault | None = None, shape: bool = False, **params: float) -> Metric:
    """A row of the table for a metric of one spectrum: ``function(σ, **params)``, or
    ``function(σ, (out, in), **params)`` when ``shape``."""
    return Metric(name, "spectral", function, label, description, better, bounds, integer, gate,
                  shape, tuple(params.items()))


_SPECTRAL = (
    spectral("fro_norm", S.fro_norm, "Frobenius norm ‖ΔW‖_F", "Frobenius norm √Σσ²",
             gate=GateDefault(rel=0.35)),
    spectral("spectral_norm", S.spectral_norm, "spectral norm σ₁", "spectral norm σ₁"),
    spectral("nuclear_norm", S.nuclear_norm, "nuclear norm Σσ", "nuclear norm Σσ"),
    spectral("rank", S.numerical_rank, "numerical rank", "#{σᵢ > σ₁·max(m,n)·ε_float32}",
             better="higher", integer=True, shape=True),
    spectral("entropy", S.entropy, "singular-value entropy H", "H = −Σ pᵢ ln pᵢ with pᵢ = σᵢ/Σσ",
             better="higher"),
    spectral("effective_rank", S.effective_rank, "effective rank exp(H)", "exp(H) (Roy & Vetterli 2007)",
             better="higher"),
    spectral("normalized_entropy", S.normalized_entropy, "normalised entropy",
             "H / ln k: 0 for one direction, 1 for a flat spectrum", better="higher", bounds=(0.0, 1.0),
             gate=GateDefault(abs=0.05, rel=0.05)),
    spectral("energy_entropy", S.energy_entropy, "normalised energy entropy",
             "the entropy of pᵢ = σᵢ²/Σσ², divided by ln k", better="higher", bounds=(0.0, 1.0)),
    spectral("stable_rank", S.stable_rank, "stable rank Σσ²/σ₁²", "Σσ²/σ₁²", better="higher"),
    spectral("energy_rank_90", S.energy_rank, "rank holding 90 % of the energy",
             "least r with Σ_{i≤r}σᵢ² ≥ 90 % of Σσ²", better="higher", integer=True, tau=0.90),
    spectral("energy_rank_99", S.energy_rank, "rank holding 99 % of the energy",
             "least r with Σ_{i≤r}σᵢ² ≥ 99 % of Σσ²", better="higher", integer=True, tau=0.99),
    spectral("top1_share", S.top_share, "top-1 energy share", "σ₁²/Σσ²", better="lower",
             bounds=(0.0, 1.0), gate=GateDefault(abs=0.15, rel=0.30), t=1),
    spectral("top8_share", S.top_share, "top-8 energy share", "Σ_{i≤8}σᵢ²/Σσ²", better="lower",
             bounds=(0.0, 1.0), t=8),
    spectral("noise_rank", RK.noise_rank, "rank above the noise threshold",
             "#{σᵢ > ω(β)·median σ}: the Gavish–Donoho threshold, unknown noise, β = min/max "
             "shape (parity with `optht`)", integer=True, shape=True),
    spectral("untrained", H.untrained, "untrained (ΔW ≡ 0)", "1 when ΔW is exactly zero: LoRA B = 0 "
             "(never trained) or a tensor bit-identical to the base (frozen); else 0",
             better="lower", bounds=(0.0, 1.0), integer=True),
)

_BASE_RELATIVE = (
    Metric("relative_norm", "base_relative", B.relative_norm, "relative norm ‖ΔW‖/‖W‖",
           "with `--base`: ‖ΔW‖_F/‖W‖_F"),
    Metric("amplification", "base_relative", B.amplification, "amplification ‖ΔW‖/‖U_rᵀWV_r‖",
           "with `--base`: ‖ΔW‖_F/‖U_rᵀWV_r‖_F, U_r, V_r the top-r singular vectors of ΔW, "
           "r = min(K, rank) (Hu et al. 2021 §7.3)"),
    Metric("intruders", "base_relative", B.intruders, "intruder dimensions",
           "with `--base`, when intruders are counted: top-10 left singular vectors of W+ΔW with "
           "max \\|cos\\| < 0.5 against every one of W (Shuttleworth et al. 2024)", better="lower",
           bounds=(0.0, 10.0), integer=True),
    Metric("lost_in_bf16", "base_relative", H.lost_share, "share of ΔW lost in bf16",
           "with `--base`: share of entries with \\|ΔWᵢⱼ\\| < ½ ulp(Wᵢⱼ) in bf16 (`--merge-dtype`): "
           "they vanish when W+ΔW is stored so", better="lower", bounds=(0.0, 1.0)),
    Metric("bf16_merge_error", "base_relative", H.merge_error, "bf16 merge error",
           "with `--base`: ‖round(W+ΔW) − W − ΔW‖_F/‖ΔW‖_F, rounded once to bf16 (`--merge-dtype`)",
           better="lower"),
)

_HEAVY_TAIL = (
    Metric("alpha", "heavy_tail", HT.alpha, "heavy-tail α of ΔW",
           "with `--alpha`: power-law exponent of ΔW's ESD λ = σ², Hill MLE with λ_min by KS "
           "distance (as WeightWatcher fits it)", bounds=(1.0, INF), takes_shape=True),
    Metric("alpha_base", "heavy_tail", HT.alpha, "heavy-tail α of W",
           "with `--alpha` and `--base`: the same of the base weight W", bounds=(1.0, INF),
           takes_shape=True),
)

_PAIRWISE = (
    Metric("cosine", "pairwise", P.cosine, "cosine ⟨ΔW_a,ΔW_b⟩", "in `compare`: ⟨ΔW_a,ΔW_b⟩_F/"
           "(‖ΔW_a‖_F‖ΔW_b‖_F)", bounds=(-1.0, 1.0)),
    Metric("subspace_sim_left", "pairwise", P.subspace_similarity, "φ(K, K), left vectors",
           "in `compare`: φ(K,K) = ‖U_aᵀU_b‖²_F/K of the top-K left singular vectors (Hu et al. §7)",
           bounds=(0.0, 1.0)),
    Metric("subspace_sim_right", "pairwise", P.subspace_similarity, "φ(K, K), right vectors",
           "in `compare`: the same of the right singular vectors", bounds=(0.0, 1.0)),
    Metric("min_angle_left", "pairwise", P.min_angle_degrees, "smallest principal angle, left (°)",
           "in `compare`: smallest principal angle (degrees) between the top-K left subspaces",
           bounds=(0.0, 90.0)),
    Metric("min_angle_right", "pairwise", P.min_angle_degrees, "smallest principal angle, right (°)",
           "in `compare`: the same between the top-K right subspaces", bounds=(0.0, 90.0)),
)

METRICS: dict[str, Metric] = {m.name: m for m in (*_SPECTRAL, *_BASE_RELATIVE, *_HEAVY_TAIL,
                                                   *_PAIRWISE)}
"""Every metric by name, in column order."""


def group(name: str) -> tuple[Metric, ...]:
    """The metrics of one group (``spectral``, ``base_relative``, ``heavy_tail`` or ``pairwise``),
    in order."""
    return tuple(m for m in METRICS.values() if m.group == name)


def names(*groups: str) -> tuple[str, ...]:
    """The column names of the metrics of ``groups``, in order."""
    return tuple(m.name for g in groups for m in group(g))


def label(column: str) -> str:
    """The plot label of a metric column; ``_topk`` (the report's top-K variant) and ``_a``/``_b``
    suffixes are understood; other columns keep their name.

    >>> label("normalized_entropy_topk"), label("top1_share_b"), label("module")
    ('normalised entropy (top K)', 'top-1 energy share (B)', 'module')
    """
    for suffix, note in (("_topk", " (top K)"), ("_a", " (A)"), ("_b", " (B)")):
        if column.endswith(suffix) and column.removesuffix(suffix) in METRICS:
            return METRICS[column.removesuffix(suffix)].label + note
    return METRICS[column].label if column in METRICS else column


def spectral_metrics(values: S.Values, shape: tuple[int, int],
                     top_k: int | None = None, rank_bound: int | None = None) -> dict[str, float]:
    """Every spectral metric of the table, over all values or over the top ``top_k`` only.

    With ``top_k``, the normalising k of the entropies is min(top_k, len(σ)), so that a rank-16
    LoRA and a full fine-tune are compared over the same number of directions. A ``top_k`` above
    the update's structural ``rank_bound`` is capped at it with a warning
    (:func:`deltaspec.metrics.within.cap_k`), never padded with zeros.

    >>> m = spectral_metrics([2.0, 1.0, 0.0], (3, 3))
    >>> m["rank"], round(m["top1_share"], 2)
    (2, 0.8)
    """
    s = S.descending(values)
    if top_k is not None:
        s = s[:top_k if rank_bound is None else cap_k(top_k, rank_bound)]
    return {m.name: m.of_spectrum(s, shape) for m in _SPECTRAL}
