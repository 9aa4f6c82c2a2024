r"""Pure functions of a collection's numbers: the chance level of φ, the shared-basis energy curve,
whole-model cosines from per-module inner products, and the clustering of the updates.

numpy and scipy in, numbers out; no pandas, matplotlib or click.

Chance level of φ. For a fixed K-dimensional subspace with orthonormal basis Uₐ ⊂ ℝᵐ and a uniformly
random one U_b (Haar measure), each column u of U_b is uniform on the unit sphere, so
E[(eᵢᵀu)²] = 1/m by symmetry and E‖Uₐᵀu‖² = K/m; summing over the K columns,
E‖UₐᵀU_b‖²_F = K²/m and E[φ(K, K)] = E‖UₐᵀU_b‖²_F / K = K/m. This is the baseline Hu et al. (2021,
LoRA, §7, Fig. 3–4) compare φ against with random Gaussian matrices;
:func:`deltaspec.report.uncertainty.random_subspace_phi` checks it by sampling.

Clustering. Distances are 1 − |cosine| of the whole-model updates (a sign flip is the same
direction); UPGMA (average) linkage, which needs no Euclidean embedding. The suggested number of
groups maximises the mean silhouette (Rousseeuw 1987) over 2 … min(N − 1, 12) groups; when even
the best mean silhouette is below 0.25 — "no substantial structure" in Kaufman & Rousseeuw's
reading — one group is suggested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_GROUPS = 12
MIN_SILHOUETTE = 0.25  # Kaufman & Rousseeuw: below this, no substantial structure


def chance_phi(k: int, dim: int) -> float:
    """E[φ(K, K)] for a uniformly random K-dimensional subspace of ℝ^dim against a fixed one:
    K/dim (see the module docstring); NaN when K < 1.

    >>> chance_phi(8, 4096), chance_phi(0, 10)
    (0.001953125, nan)
    """
    return k / dim if k >= 1 and dim >= 1 else math.nan


def energy_curve(eigenvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Share of the total energy Σλ captured by the top-d shared directions, d = 1 … len:
    cumsum of the eigenvalues λ of Σₐ ΔWₐΔWₐᵀ (descending) over their sum; NaN when all are 0.

    >>> energy_curve([3.0, 1.0, 0.0]).tolist()
    [0.75, 1.0, 1.0]
    """
    lam = np.clip(np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1], 0.0, None)
    total = lam.sum()
    if total <= 0:
        return np.full(lam.size, np.nan)
    return np.minimum(np.cumsum(lam) / total, 1.0)


def dims_for_energy(eigenvalues: Sequence[float] | np.ndarray, tau: float) -> int:
    """The least d whose top-d shared directions keep ``tau`` of the energy (0 for no energy).

    >>> dims_for_energy([3.0, 1.0, 0.0], 0.9), dims_for_energy([0.0], 0.9)
    (2, 0)
    """
    curve = energy_curve(eigenvalues)
    if not curve.size or np.isnan(curve[-1]):
        return 0
    return int(np.searchsorted(curve, tau - 1e-12) + 1)


def whole_cosine(inner: np.ndarray) -> np.ndarray:
    """Cosines of the concatenated updates from the summed per-module inner products (N, N):
    G_ab / √(G_aa G_bb); NaN where an update is zero.

    >>> whole_cosine(np.array([[4.0, 2.0], [2.0, 1.0]])).round(6).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """
    d = np.sqrt(np.clip(np.diag(inner), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = inner / np.outer(d, d)
    cos[np.outer(d, d) == 0] = np.nan
    return np.clip(cos, -1.0, 1.0)


def silhouette(dist: np.ndarray, groups: np.ndarray) -> float:
    """Mean silhouette of a grouping under a distance matrix (singletons count 0; Rousseeuw 1987).

    >>> d = np.array([[0, 1, 9, 9], [1, 0, 9, 9], [9, 9, 0, 1], [9, 9, 1, 0]], dtype=float)
    >>> round(silhouette(d, np.array([1, 1, 2, 2])), 4)
    0.8889
    """
    labels = np.unique(groups)
    if labels.size < 2:
        return math.nan
    scores = np.zeros(len(groups))
    for i in range(len(groups)):
        own = groups == groups[i]
        if own.sum() <= 1:
            continue
        a = dist[i, own].sum() / (own.sum() - 1)
        b = min(dist[i, groups == g].mean() for g in labels if g != groups[i])
        scores[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(scores.mean())


@dataclass(frozen=True)
class Clusters:
    """Hierarchical clustering of N updates: the scipy ``linkage`` matrix, the dendrogram's leaf
    order, the suggested number of groups, each update's group (1-based) and why."""

    linkage: np.ndarray
    order: list[int]
    groups: int
    assignment: list[int]
    silhouettes: dict[int, float]
    criterion: str


def cluster(cosine: np.ndarray) -> Clusters:
    """Cluster updates on 1 − |cosine| (UPGMA) and suggest a number of groups (module docstring).

    >>> c = np.array([[1, .9, 0, 0], [.9, 1, 0, 0], [0, 0, 1, .8], [0, 0, .8, 1]], dtype=float)
    >>> r = cluster(c)
    >>> r.groups, r.assignment
    (2, [1, 1, 2, 2])
    """
    from scipy.cluster.hierarchy import fcluster, leaves_list, linkage
    from scipy.spatial.distance import squareform

    n = cosine.shape[0]
    dist = 1.0 - np.abs(np.nan_to_num(cosine, nan=0.0))
    np.fill_diagonal(dist, 0.0)
    dist = np.clip((dist + dist.T) / 2, 0.0, None)
    z = linkage(squareform(dist, checks=False), method="average")
    order = [int(i) for i in leaves_list(z)]
    sil = {g: silhouette(dist, fcluster(z, g, criterion="maxclust"))
           for g in range(2, min(n - 1, MAX_GROUPS) + 1)}
    sil = {g: s for g, s in sil.items() if not math.isnan(s)}
    best = max(sil, key=lambda g: (sil[g], -g)) if sil else 1
    rule = (f"the number of groups with the highest mean silhouette on 1 − |cosine| over 2…"
            f"{min(n - 1, MAX_GROUPS)} groups (average linkage)")
    if not sil or sil[best] < MIN_SILHOUETTE:
        best = 1
        rule += f"; one group, as no grouping reaches a mean silhouette of {MIN_SILHOUETTE}"
    else:
        rule += f": {best} groups, mean silhouette {sil[best]:.3f}"
    assign = fcluster(z, best, criterion="maxclust") if best > 1 else np.ones(n, dtype=int)
    return Clusters(z, order, best, [int(g) for g in _renumber(assign, order)], sil, rule)


def _renumber(assign: np.ndarray, order: list[int]) -> np.ndarray:
    """Groups numbered 1, 2, … in the dendrogram's left-to-right order."""
    first: dict[int, int] = {}
    for i in order:
        first.setdefault(int(assign[i]), len(first) + 1)
    return np.array([first[int(g)] for g in assign])


__all__ = ["Clusters", "chance_phi", "cluster", "dims_for_energy", "energy_curve", "silhouette",
           "whole_cosine"]
