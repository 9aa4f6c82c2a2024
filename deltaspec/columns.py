"""Every output column, defined once: names, order, dtypes, and which ones the CLI table shows."""

from __future__ import annotations

IDENTITY = ("module", "layer", "kind", "method", "shape", "rank_bound")
SPECTRAL = (
    "fro_norm", "spectral_norm", "nuclear_norm", "rank", "entropy", "effective_rank",
    "normalized_entropy", "energy_entropy", "stable_rank", "energy_rank_90", "energy_rank_99",
    "top1_share", "top8_share",
)
BASE_RELATIVE = ("relative_norm", "amplification", "intruders")
PAIRWISE = ("cosine", "subspace_sim_left", "subspace_sim_right", "min_angle_left", "min_angle_right")

INTEGER = frozenset({"rank_bound", "rank", "energy_rank_90", "energy_rank_99", "intruders"})
# Columns that pair as <name>_a / <name>_b in a comparison.
PER_SIDE_IDENTITY = ("method", "rank_bound")

DESCRIPTIONS = {
    "module": "canonical module path",
    "layer": "block index (first integer in the path)",
    "kind": "module kind (last path component), e.g. q_proj",
    "method": "lora, multilora, dora, full, modules_to_save or trainable_tokens",
    "shape": "(out × in) of ΔW",
    "rank_bound": "structural rank bound: Σr for factored deltas, min(out, in) for dense",
    "fro_norm": "‖ΔW‖_F",
    "spectral_norm": "σ₁",
    "nuclear_norm": "Σσ",
    "rank": "#{σ > σ₁·max(m,n)·ε_f32}",
    "entropy": "−Σ p ln p, p = σ/Σσ",
    "effective_rank": "exp(entropy)",
    "normalized_entropy": "entropy / ln k",
    "energy_entropy": "entropy of σ²/Σσ², / ln k",
    "stable_rank": "Σσ²/σ₁²",
    "energy_rank_90": "least r holding 90% of Σσ²",
    "energy_rank_99": "least r holding 99% of Σσ²",
    "top1_share": "σ₁²/Σσ²",
    "top8_share": "Σ_{i≤8}σᵢ²/Σσ²",
    "relative_norm": "‖ΔW‖_F / ‖W‖_F",
    "amplification": "‖ΔW‖_F / ‖U_rᵀ W V_r‖_F",
    "intruders": "top-10 left singular vectors of W+ΔW with max |cos| < 0.5 against W's",
    "cosine": "⟨ΔW_a, ΔW_b⟩_F / (‖ΔW_a‖‖ΔW_b‖)",
    "subspace_sim_left": "φ(K, K) of the left singular vectors",
    "subspace_sim_right": "φ(K, K) of the right singular vectors",
    "min_angle_left": "smallest principal angle (degrees) between the top-K left subspaces",
    "min_angle_right": "smallest principal angle (degrees) between the top-K right subspaces",
}

TABLE_ANALYZE = ("module", "shape", "rank_bound", "fro_norm", "entropy", "normalized_entropy",
                 "effective_rank", "stable_rank", "top1_share")
TABLE_BASE = ("relative_norm", "intruders")
TABLE_COMPARE = ("module", "shape", "normalized_entropy_a", "normalized_entropy_b",
                 "effective_rank_a", "effective_rank_b", "subspace_sim_left",
                 "subspace_sim_right", "cosine")


def analyze_columns(with_base: bool) -> list[str]:
    """Column order of an ``analyze`` table."""
    return [*IDENTITY, *SPECTRAL, *(BASE_RELATIVE if with_base else ())]


def compare_columns(with_base: bool) -> list[str]:
    """Column order of a ``compare`` table: identity, each side's metrics, then the pairwise ones."""
    sided = [*PER_SIDE_IDENTITY, *SPECTRAL, *(BASE_RELATIVE if with_base else ())]
    ident = [c for c in IDENTITY if c not in PER_SIDE_IDENTITY]
    return [*ident, *(f"{c}_{s}" for c in sided for s in ("a", "b")), *PAIRWISE]


def table_columns(columns: list[str]) -> list[str]:
    """The columns the CLI's table shows, out of a frame's columns."""
    wanted: tuple[str, ...]
    if "cosine" in columns:
        wanted = TABLE_COMPARE
    else:
        wanted = TABLE_ANALYZE + (TABLE_BASE if "relative_norm" in columns else ())
    return [c for c in wanted if c in columns]


def is_integer(column: str) -> bool:
    """True for integer-valued columns (also ``rank_a`` etc.)."""
    return column.removesuffix("_a").removesuffix("_b") in INTEGER
