"""The report's subspace similarity: φ(K, K) per pair of updates and module, with the chance
level of random subspaces, and the φ(i, j) grids of one module for the heatmaps."""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from deltaspec import metrics as M
from deltaspec.engine.spectrum import Spectrum
from deltaspec.errors import UsageError
from deltaspec.names import kind_of, kind_order, layer_of, match_key
from deltaspec.report.uncertainty import random_subspace_phi


@dataclass(frozen=True)
class SimilarityGrid:
    """φ(i, j) between the top singular vectors of one module in two updates (rows: ``label_a``)."""

    label_a: str
    label_b: str
    module: str
    side: str  # "left" (U) or "right" (V)
    values: np.ndarray  # (k_a, k_b), φ(i, j) at values[i-1, j-1]


def _vectors(sp: Spectrum, k: int, side: str) -> torch.Tensor:
    mat = sp.U if side == "left" else sp.V
    r = min(k, M.numerical_rank(sp.values, sp.shape))
    return mat[:, :r] if mat is not None else torch.zeros(sp.shape[0 if side == "left" else 1], 0)


@functools.lru_cache(maxsize=256)
def _chance(n: int, k: int) -> tuple[float, float]:
    """φ(k, k) of random k-dimensional subspaces of ℝⁿ: (mean, sd); NaN when undefined."""
    if k < 1 or n < k:
        return math.nan, math.nan
    return random_subspace_phi(n, k)


def similarity_table(labels: list[str], names: dict[str, list[str]],
                     raw: dict[str, dict[str, Spectrum]], k: int) -> pd.DataFrame:
    """Per pair of labels and common module: φ(K, K) of the left and right singular vectors, and
    the chance level of φ for random subspaces of the same size (``chance_*``: mean, ``*_sd``).
    ``names``: per label, the module names as the plan paired them (index-aligned:
    :func:`deltaspec.plan.pair`)."""
    rows = []
    for a, b in itertools.combinations(labels, 2):
        for na, nb in zip(names[a], names[b], strict=True):
            sa, sb = raw[a][na], raw[b][nb]
            row: dict[str, Any] = {"label_a": a, "label_b": b, "pair": f"{a} vs {b}",
                                   "module": na, "layer": layer_of(na), "kind": kind_of(na)}
            for side in ("left", "right"):
                ua, ub = _vectors(sa, k, side), _vectors(sb, k, side)
                row[f"k_{side}"] = kk = min(ua.shape[1], ub.shape[1])
                row[f"phi_{side}"] = M.subspace_similarity(ua, ub, k)
                row[f"chance_{side}"], row[f"chance_{side}_sd"] = _chance(ua.shape[0], kk)
            rows.append(row)
    columns = ["label_a", "label_b", "pair", "module", "layer", "kind", "k_left", "phi_left",
               "k_right", "phi_right", "chance_left", "chance_left_sd", "chance_right",
               "chance_right_sd"]
    df = pd.DataFrame(rows, columns=columns)
    df["pair"] = pd.Categorical(df["pair"], categories=list(dict.fromkeys(df["pair"])), ordered=True)
    df["kind"] = pd.Categorical(df["kind"], categories=kind_order(df["kind"]), ordered=True)
    return df.astype({"layer": "Int64", "k_left": "int64", "k_right": "int64",
                      "label_a": "string", "label_b": "string", "module": "string"})


def pick_module(names: list[str], module: str | None) -> str:
    """The module of the heatmaps: ``module`` (any prefix spelling), or a q-like one mid-depth."""
    if module is not None:
        hit = [n for n in names if match_key(n) == match_key(module)]
        if not hit:
            raise UsageError(f"module {module!r} is not common to every update "
                             f"(e.g. {', '.join(names[:3])})")
        return hit[0]
    layers = sorted({x for x in map(layer_of, names) if x is not None})
    mid = layers[len(layers) // 2] if layers else None
    pool = [n for n in names if layer_of(n) == mid] or names
    first_kind = kind_order([kind_of(n) for n in pool])[0]
    return next(n for n in pool if kind_of(n) == first_kind)


def similarity_grids(labels: list[str], names: dict[str, list[str]],
                     raw: dict[str, dict[str, Spectrum]], module: str, k: int) -> list[SimilarityGrid]:
    """φ(i, j) of the left singular vectors of ``module`` (a name of the first label's) for every
    pair of labels; ``names`` index-aligned as in :func:`similarity_table`."""
    grids = []
    j = names[labels[0]].index(module)
    for a, b in itertools.combinations(labels, 2):
        na, nb = names[a][j], names[b][j]
        ua, ub = _vectors(raw[a][na], k, "left"), _vectors(raw[b][nb], k, "left")
        grid = M.subspace_similarity_grid(ua, ub).numpy() if ua.shape[1] and ub.shape[1] \
            else np.zeros((ua.shape[1], ub.shape[1]))
        grids.append(SimilarityGrid(a, b, na, "left", grid))
    return grids
