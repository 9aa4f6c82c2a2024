"""Pure metric functions: of one spectrum, between two updates, and against the base weight,
and the metric table (:data:`METRICS`, :mod:`deltaspec.metrics.table`) that declares each once.

No pandas, matplotlib or click here: tensors in, floats out.
"""

from deltaspec.metrics.base_relative import amplification, intruders, relative_norm
from deltaspec.metrics.health import untrained, untrained_note
from deltaspec.metrics.heavy_tail import alpha
from deltaspec.metrics.pairwise import (
    cosine,
    min_angle_degrees,
    principal_angles,
    subspace_similarity,
    subspace_similarity_grid,
)
from deltaspec.metrics.spectral import (
    effective_rank,
    energy_entropy,
    energy_rank,
    entropy,
    fro_norm,
    normalized_entropy,
    nuclear_norm,
    numerical_rank,
    spectral_norm,
    stable_rank,
    top_share,
)
from deltaspec.metrics.table import METRICS, Metric, spectral_metrics

__all__ = [
    "METRICS",
    "Metric",
    "alpha",
    "amplification",
    "cosine",
    "effective_rank",
    "energy_entropy",
    "energy_rank",
    "entropy",
    "fro_norm",
    "intruders",
    "min_angle_degrees",
    "normalized_entropy",
    "nuclear_norm",
    "numerical_rank",
    "principal_angles",
    "relative_norm",
    "spectral_metrics",
    "spectral_norm",
    "stable_rank",
    "subspace_similarity",
    "subspace_similarity_grid",
    "top_share",
    "untrained",
    "untrained_note",
]
