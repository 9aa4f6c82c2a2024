"""A collection's per-module numbers (:class:`~deltaspec.engine.collection.ModuleStats`) → its tidy
tables: pairs, the whole-model matrix, clusters, the shared-basis curves and the per-module spread.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from deltaspec.engine.collection import ModuleStats
from deltaspec.metrics.collection import (
    Clusters,
    chance_phi,
    cluster,
    dims_for_energy,
    energy_curve,
    whole_cosine,
)
from deltaspec.metrics.spectral import numerical_rank
from deltaspec.names import kind_of, kind_order, layer_of

BAND = (0.10, 0.90)  # the spread drawn around the median across layers
ENERGY = (0.90, 0.99)  # the shares the shared-basis dimension is reported for
PAIR_COLUMNS = ["a", "b", "module", "layer", "kind", "cosine", "subspace_similarity_left",
                "subspace_similarity_right", "min_angle_degrees_left", "min_angle_degrees_right",
                "k", "chance_left", "chance_right"]


def _cos(inner: np.ndarray) -> np.ndarray:
    return whole_cosine(inner)


def pairs_table(labels: list[str], stats: Mapping[str, ModuleStats],
                shapes: Mapping[str, tuple[int, int]]) -> pd.DataFrame:
    """One row per (a, b, module) with a before b (in the order the updates were given)."""
    n = len(labels)
    ia, ib = np.triu_indices(n, 1)
    parts = []
    for name, st in stats.items():
        m, w = shapes[name]
        k = st.k[ia, ib]
        parts.append(pd.DataFrame({
            "a": np.asarray(labels, dtype=object)[ia], "b": np.asarray(labels, dtype=object)[ib],
            "module": name, "layer": layer_of(name), "kind": kind_of(name),
            "cosine": _cos(st.inner)[ia, ib],
            "subspace_similarity_left": st.phi_left[ia, ib],
            "subspace_similarity_right": st.phi_right[ia, ib],
            "min_angle_degrees_left": st.angle_left[ia, ib],
            "min_angle_degrees_right": st.angle_right[ia, ib], "k": k,
            "chance_left": [chance_phi(int(x), m) for x in k],
            "chance_right": [chance_phi(int(x), w) for x in k]}))
    df = pd.concat(parts, ignore_index=True)[PAIR_COLUMNS]
    df["kind"] = pd.Categorical(df["kind"], categories=kind_order(df["kind"]), ordered=True)
    return df.astype({"layer": "Int64", "k": "int64"})


def matrix_table(labels: list[str], stats: Mapping[str, ModuleStats]) -> tuple[pd.DataFrame, np.ndarray]:
    """Whole-model cosine (Σ of inner products over modules) and mean φ, per ordered pair."""
    inner = sum(st.inner for st in stats.values())
    cos = whole_cosine(np.asarray(inner))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a zero update: φ NaN everywhere
        phi_l = np.nanmean(np.stack([st.phi_left for st in stats.values()]), axis=0)
        phi_r = np.nanmean(np.stack([st.phi_right for st in stats.values()]), axis=0)
    n = len(labels)
    ia, ib = np.indices((n, n)).reshape(2, -1)
    lab = np.asarray(labels, dtype=object)
    df = pd.DataFrame({"a": lab[ia], "b": lab[ib], "cosine": cos[ia, ib],
                       "phi_left": phi_l[ia, ib], "phi_right": phi_r[ia, ib]})
    return df, cos


def _curves(stats: Mapping[str, ModuleStats], side: str) -> pd.DataFrame:
    """Per (kind, d): median and 10–90 % band across layers of the shared-basis energy."""
    parts = []
    by_kind: dict[str, list[np.ndarray]] = {}
    for name, st in stats.items():
        by_kind.setdefault(kind_of(name), []).append(energy_curve(getattr(st, f"basis_{side}")))
    for kind in kind_order(by_kind):
        curves = by_kind[kind]
        width = max(c.size for c in curves)
        stack = np.vstack([np.pad(c, (0, width - c.size), mode="edge") if c.size else
                           np.full(width, np.nan) for c in curves])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lo, mid, hi = np.nanquantile(stack, [BAND[0], 0.5, BAND[1]], axis=0)
        parts.append(pd.DataFrame({"kind": kind, "side": side, "d": np.arange(1, width + 1),
                                   "energy": mid, "energy_lo": lo, "energy_hi": hi,
                                   "modules": len(curves)}))
    return pd.concat(parts, ignore_index=True)


def basis_table(stats: Mapping[str, ModuleStats]) -> pd.DataFrame:
    """The shared-basis curves of both sides (left: output directions, right: input ones)."""
    df = pd.concat([_curves(stats, "left"), _curves(stats, "right")], ignore_index=True)
    df["kind"] = pd.Categorical(df["kind"], categories=kind_order(df["kind"]), ordered=True)
    return df.astype({"d": "int64", "modules": "int64"})


def _offdiag(x: np.ndarray) -> np.ndarray:
    return x[~np.eye(x.shape[0], dtype=bool)]


def modules_table(stats: Mapping[str, ModuleStats],
                  shapes: Mapping[str, tuple[int, int]]) -> pd.DataFrame:
    """Per module: how much it varies across the collection (``spread`` = 1 − mean |cosine|)."""
    rows = []
    for name, st in stats.items():
        norms = np.sqrt(np.clip(np.diag(st.inner), 0.0, None))
        cos = _offdiag(_cos(st.inner))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            row = {"module": name, "layer": layer_of(name), "kind": kind_of(name),
                   "shape": f"{shapes[name][0]}x{shapes[name][1]}",
                   "spread": 1.0 - float(np.nanmean(np.abs(cos))),
                   "mean_cosine": float(np.nanmean(cos)), "min_cosine": float(np.nanmin(cos)),
                   "phi_left": float(np.nanmean(_offdiag(st.phi_left))),
                   "phi_right": float(np.nanmean(_offdiag(st.phi_right))),
                   "norm_mean": float(norms.mean()),
                   "norm_cv": float(norms.std() / norms.mean()) if norms.mean() > 0 else np.nan}
        for side in ("left", "right"):
            lam = getattr(st, f"basis_{side}")
            row[f"basis_dim_{side}"] = numerical_rank(np.sqrt(np.clip(lam, 0.0, None)), shapes[name])
            for tau in ENERGY:
                row[f"basis_d{round(tau * 100)}_{side}"] = dims_for_energy(lam, tau)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["kind"] = pd.Categorical(df["kind"], categories=kind_order(df["kind"]), ordered=True)
    return df.astype({"layer": "Int64"})


def clusters_table(labels: list[str], tree: Clusters) -> pd.DataFrame:
    """Per update: its position in the dendrogram and its suggested group."""
    pos = {i: p for p, i in enumerate(tree.order)}
    return pd.DataFrame({"label": labels, "order": [pos[i] for i in range(len(labels))],
                         "group": tree.assignment}).sort_values("order", ignore_index=True)


def build_tables(labels: list[str], stats: Mapping[str, ModuleStats],
                 shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
    """Every table of a collection from its per-module numbers: the fields of
    :class:`deltaspec.collection.ZooResult` ``pairs``, ``matrix``, ``clusters``, ``basis``,
    ``modules``, ``tree`` and ``notes``."""
    matrix, cos = matrix_table(labels, stats)
    tree = cluster(cos)
    notes = []
    zero = [lb for lb, c in zip(labels, np.diag(cos), strict=True) if np.isnan(c)]
    if zero:
        notes.append(f"note: update(s) {', '.join(zero)} are zero in every module compared: "
                     "their cosines and φ are undefined (NaN)")
    return {"pairs": pairs_table(labels, stats, shapes), "matrix": matrix,
            "clusters": clusters_table(labels, tree), "basis": basis_table(stats),
            "modules": modules_table(stats, shapes), "tree": tree, "notes": notes}


__all__ = ["PAIR_COLUMNS", "basis_table", "build_tables", "clusters_table",
           "matrix_table", "modules_table", "pairs_table"]
