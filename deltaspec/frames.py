"""The DataFrames ``analyze``/``compare`` return, as the report's tables, so that every figure of
:mod:`deltaspec.plots` draws them directly: ``plots.plot_spectra(deltaspec.analyze(path))``.

A result frame carries its singular values in ``df.attrs["spectra"]`` (module → σ, float64; a
comparison: module → (σ_A, σ_B)): pandas keeps ``attrs`` through filtering, sorting and column
selection, so a filtered frame plots its own rows. :class:`Sigmas` never deep-copies and compares
by identity, so ``pd.concat`` of frames from different runs does not fail (it drops them: label
and concatenate ``report.collect`` tables instead, or call :func:`deltaspec.plot_democracy`).

No matplotlib here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from deltaspec import metrics as M
from deltaspec.engine.spectrum import Spectrum
from deltaspec.errors import UsageError
from deltaspec.rows import sigma

ATTR = "spectra"
DEFAULT_LABELS = ("update", ("A", "B"))


class Sigmas(dict):
    """Module → σ (numpy float64), or → (σ_A, σ_B): shared, never copied, equal only to itself."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Sigmas:
        return self

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:  # type: ignore[override]
        return id(self)


def attach(df: pd.DataFrame, values: Mapping[str, Any], k: int,
           labels: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Put ``values`` (module → σ from :func:`sigma`, or → (σ_A, σ_B)) into ``df.attrs``, with
    the subspace dimension ``k`` of the pairwise columns; ``labels``: how figures name the sides."""
    df.attrs[ATTR] = Sigmas(values)
    df.attrs["k"] = k
    if labels is not None:
        df.attrs["labels"] = labels
    return df


def is_result(data: Any) -> bool:
    """True for a frame ``analyze`` or ``compare`` returned (or a filtered view of one)."""
    return isinstance(data, pd.DataFrame) and "module" in data.columns and "label" not in data.columns \
        and ("normalized_entropy" in data.columns or "normalized_entropy_a" in data.columns)


def _shape(text: Any) -> tuple[int, int]:
    m, _, n = str(text).partition("×")
    return int(m), int(n)


def _spectrum(values: np.ndarray, shape: tuple[int, int]) -> Spectrum:
    return Spectrum(torch.from_numpy(np.asarray(values, dtype=np.float64)), shape, "given")


def common_k(metrics: pd.DataFrame) -> int:
    """The K of the fair entropy (:func:`deltaspec.report.data.fair_k`) of a table's modules."""
    from deltaspec.report.data import fair_k

    return fair_k([int(b) for b in metrics["rank_bound"]],
                  [min(_shape(s)) for s in metrics["shape"]])


def _side(df: pd.DataFrame, suffix: str) -> pd.DataFrame:
    """One side of a comparison as an analyze-like frame (columns without ``_a``/``_b``)."""
    out = {}
    for c in df.columns:
        if c.endswith(suffix):
            out[c.removesuffix(suffix)] = df[c]
        elif not (c.endswith("_a") or c.endswith("_b")):
            out.setdefault(c, df[c])
    return pd.DataFrame(out)


def _with_topk(side: pd.DataFrame, sigmas: dict[str, np.ndarray] | None, k: int) -> pd.DataFrame:
    side = side.copy()
    if "run" not in side:
        side["run"] = 0  # one run of each update (the report's tables carry a run column)
    if sigmas is None:
        side["normalized_entropy_topk"] = math.nan
        side["effective_rank_topk"] = math.nan
        return side
    vals = [torch.from_numpy(sigmas[m][:k]) for m in side["module"]]
    side["normalized_entropy_topk"] = [M.normalized_entropy(v) for v in vals]
    side["effective_rank_topk"] = [M.effective_rank(v) for v in vals]
    return side


def _sigmas(df: pd.DataFrame, index: int | None) -> dict[str, np.ndarray] | None:
    found = df.attrs.get(ATTR)
    if not isinstance(found, Mapping) or not all(m in found for m in df["module"]):
        return None
    return {m: (found[m] if index is None else found[m][index]) for m in df["module"]}


def report_data(df: pd.DataFrame) -> Any:
    """An ``analyze``/``compare`` frame as a :class:`deltaspec.report.ReportData` (its tables)."""
    from deltaspec.report.data import (
        ReportData,
        _metrics,
        kind_order,
        spectra_table,
    )

    pair = "normalized_entropy_a" in df.columns
    labels = list(df.attrs.get("labels") or (DEFAULT_LABELS[1] if pair else (DEFAULT_LABELS[0],)))
    if df.empty:
        raise UsageError("nothing to plot: the table is empty")
    sides = [_side(df, "_a"), _side(df, "_b")] if pair else [pd.DataFrame(df)]
    sigmas = [_sigmas(df, i if pair else None) for i in range(len(sides))]
    k = common_k(pd.concat(sides, ignore_index=True))
    frames = {lb: _with_topk(s, sg, k) for lb, s, sg in zip(labels, sides, sigmas, strict=True)}
    metrics = _metrics(labels, frames)
    metrics.attrs["top_k"] = k
    raw = None
    if all(sg is not None for sg in sigmas):
        raw = {lb: {m: _spectrum(sg[m], _shape(s)) for m, s in zip(df["module"], df["shape"], strict=True)}
               for lb, sg in zip(labels, sigmas, strict=True) if sg is not None}
    spectra = spectra_table(metrics, raw) if raw is not None else None
    similarity = _similarity(df, labels, kind_order) if pair else pd.DataFrame(
        columns=["label_a", "label_b", "pair", "module", "layer", "kind", "k_left", "phi_left",
                 "k_right", "phi_right"])
    return ReportData(labels=labels, paths={lb: lb for lb in labels}, base=None, k=k, top_k=k,
                      metrics=metrics, spectra=spectra, similarity=similarity, grids=[],
                      module=None)


def _similarity(df: pd.DataFrame, labels: list[str], kind_order: Any) -> pd.DataFrame:
    a, b = labels
    k = int(df.attrs.get("k", 8))
    out = pd.DataFrame({"label_a": a, "label_b": b, "pair": f"{a} vs {b}", "module": df["module"],
                        "layer": df["layer"], "kind": df["kind"].astype(str),
                        "k_left": k, "phi_left": df["subspace_sim_left"],
                        "k_right": k, "phi_right": df["subspace_sim_right"]})
    out["pair"] = pd.Categorical(out["pair"], categories=[f"{a} vs {b}"], ordered=True)
    out.attrs["k"] = k
    out["kind"] = pd.Categorical(out["kind"], categories=kind_order(out["kind"]), ordered=True)
    return out.reset_index(drop=True)


def as_report_data(data: Any) -> Any:
    """What a figure draws: a typed result (:class:`~deltaspec.result.Analysis`) or a frame
    ``analyze``/``compare`` returned → its :class:`~deltaspec.report.ReportData`; anything else
    (report data, its tables) as is."""
    from deltaspec.result import Analysis

    if isinstance(data, Analysis):
        return report_data(attach(data.frame(), data.sigmas, data.k))
    return report_data(data) if is_result(data) else data


NO_SPECTRA = ("this table carries no singular values (they live in df.attrs['spectra'], which "
              "pd.concat of different runs drops): plot the frame analyze/compare returned, or "
              "use deltaspec.plot_democracy({label: update, …})")

__all__ = ["ATTR", "NO_SPECTRA", "Sigmas", "as_report_data", "attach", "common_k", "is_result",
           "report_data", "sigma"]
