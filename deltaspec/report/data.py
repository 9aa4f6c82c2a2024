"""The democracy report's data: several labelled updates of one base → tidy pandas tables.

``collect`` loads every update, checks that they are updates of the same model (same module
shapes, and the same ``base`` when one is given), analyses the modules common to all of them and
builds the tables the figures and the verdict are drawn from:

- ``metrics``: one row per (label, module): ``analyze``'s columns plus the entropy and effective
  rank over the top ``top_k`` singular values (a K common to every update, so that a rank-16 LoRA
  and a full fine-tune are compared over the same number of directions);
- ``spectra``: per (label, module kind, i): the median and the 10–90 % band across layers of the
  normalised spectrum σᵢ/σ₁ and of the cumulative energy Σ_{j≤i}σⱼ²/Σσ²;
- ``similarity``: per (pair of labels, module): subspace similarity φ at K of the left and right
  singular vectors;
- ``grids``: φ(i, j) for one chosen module, one grid per pair of labels (for heatmaps);
- ``nulls``: one row per (label, run, module, null kind): the K-resolved metrics of that module's
  null updates (:mod:`deltaspec.report.null_updates`: random same-rank; a full FT's update
  projected on a random rank-r input subspace; MultiLoRA with equalised |sᵢ|).

Every update also gets the K-resolved metrics (:mod:`deltaspec.metrics.within`) at r = the report's
K (default: the smallest structural rank compared; a larger ``top_k`` is capped at it, with a
warning).

A label may name several runs of one method (seeds: ``lora=run1,run2`` or a glob): ``metrics``
then holds one row per (label, run, module) (column ``run``), the spectra bands pool the runs, and
the verdict's intervals resample runs as well as modules; φ is computed on each label's first run.

No matplotlib here; the math is deltaspec.metrics'.
"""

from __future__ import annotations

import dataclasses
import glob
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from deltaspec import metrics as M
from deltaspec.delta import Delta
from deltaspec.engine.spectrum import Spectrum
from deltaspec.errors import ShapeError, UsageError
from deltaspec.loaders.registry import Deltas, load_side
from deltaspec.loaders.sources.live import describe
from deltaspec.loop import run
from deltaspec.metrics.within import cap_k, k_columns, k_metrics
from deltaspec.names import kind_order, match_key
from deltaspec.options import Options, make_options
from deltaspec.plan import Request, build, one_sided, pair
from deltaspec.report.null_updates import NULL_KINDS, null_spectra
from deltaspec.report.similarity import (
    SimilarityGrid,
    pick_module,
    similarity_grids,
    similarity_table,
)

BAND = (0.10, 0.90)  # the spread drawn around the median across layers
_LABEL = re.compile(r"^[A-Za-z0-9_.+\-]+$")


@dataclass
class ReportData:
    """Everything the democracy report shows, as tables (see the module docstring)."""

    labels: list[str]
    paths: dict[str, str]  # label → its folder (several runs: joined by ", ")
    base: str | None
    k: int
    top_k: int
    metrics: pd.DataFrame
    spectra: pd.DataFrame
    similarity: pd.DataFrame
    grids: list[SimilarityGrid]
    module: str | None
    only_in: dict[str, list[str]] = field(default_factory=dict)
    raw: dict[str, dict[str, Spectrum]] = field(default_factory=dict, repr=False)
    runs: dict[str, list[str]] = field(default_factory=dict)  # label → every run's folder
    nulls: pd.DataFrame = field(default_factory=pd.DataFrame)  # see the module docstring

    def methods(self) -> dict[str, str]:
        """Label → the update's method as its checkpoint says (lora, multilora, full, …)."""
        out = {}
        for label, group in self.metrics.groupby("label", observed=True, sort=False):
            found = sorted(set(group["method"].dropna()))
            out[str(label)] = found[0] if len(found) == 1 else "+".join(found)
        return out


def parse_updates(specs: Sequence[str]) -> dict[str, str | list[str]]:
    """``["lora=path/a", "full=path/b"]`` → ``{"lora": "path/a", "full": "path/b"}``.

    Several runs of one method: ``lora=run1,run2`` or a glob ``lora=runs/lora-seed*`` → a list.
    Labels are letters, digits and ``_ . + -``; a label given twice is an error.
    """
    out: dict[str, str | list[str]] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        label = label.strip()
        if not sep or not label or not path:
            raise UsageError(f"{spec!r}: expected NAME=PATH (e.g. lora=./adapter)")
        if label in out:
            raise UsageError(f"label {label!r} given twice ({out[label]} and {path})")
        runs = [r for part in path.split(",") if part for r in _expand(part)]
        out[label] = runs[0] if len(runs) == 1 else runs
    check_labels(list(out))
    return out


def _expand(part: str) -> list[str]:
    """A path, or the sorted matches of a glob pattern (none is an error)."""
    if not any(c in part for c in "*?["):
        return [part]
    hits = sorted(glob.glob(part))
    if not hits:
        raise UsageError(f"{part}: the pattern matches no checkpoint folder")
    return hits


def _runs(updates: Mapping[str, Any]) -> dict[str, list[Any]]:
    """label → list of runs (folders, Hub ids or live objects; a single one becomes a list)."""
    out = {}
    for label, p in updates.items():
        runs = list(p) if isinstance(p, list | tuple) else [p]
        if not runs:
            raise UsageError(f"label {label!r}: no checkpoint given")
        out[str(label)] = runs
    return out


def spectrum_key(module: str, run: int) -> str:
    """Key of a module's spectrum in ``ReportData.raw[label]`` (run 0: the module name itself)."""
    return module if run == 0 else f"{module}@run{run}"


def check_labels(labels: Sequence[str]) -> None:
    """Labels must be present, distinct and plain (they name columns, legends and files)."""
    if not labels:
        raise UsageError("no update given: pass one or more NAME=PATH")
    for label in labels:
        if not _LABEL.match(label):
            raise UsageError(f"label {label!r}: use letters, digits and _ . + - only")
    seen: dict[str, str] = {}
    for label in labels:
        if label.lower() in seen:
            raise UsageError(f"label {label!r} given twice (as {seen[label.lower()]!r})")
        seen[label.lower()] = label


def _check_shapes(loaded: dict[str, Deltas], paths: Mapping[str, Any]) -> None:
    """Every module present in several updates must have one shape: else they are not one base's."""
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for label, deltas in loaded.items():
        for name, d in deltas.items():
            key = match_key(name)
            if key not in seen:
                seen[key] = (label, d.shape)
                continue
            other, shape = seen[key]
            if shape != d.shape:
                raise ShapeError(
                    f"module {name!r}: shape {shape[0]}×{shape[1]} in {other} ({paths[other]}) but "
                    f"{d.shape[0]}×{d.shape[1]} in {label} ({paths[label]}): updates of different bases")


def _common(loaded: dict[str, Deltas], include: str | None) -> tuple[dict[str, list[str]], dict]:
    """Per label, its names of the modules every update has (in the first update's order,
    paired by the plan's one :func:`~deltaspec.plan.pair`), and those only some have."""
    labels, sides = list(loaded), [list(d) for d in loaded.values()]
    items = pair(sides, include, labels=labels)
    only = one_sided(sides, pair(sides, labels=labels))
    return ({label: [it[i] for it in items] for i, label in enumerate(labels)},
            dict(zip(labels, only, strict=True)))


def _topk_columns(df: pd.DataFrame, spectra: dict[str, Spectrum], top_k: int) -> pd.DataFrame:
    vals = [spectra[m].values[:top_k] for m in df["module"]]
    df = df.copy()
    df["normalized_entropy_topk"] = [M.normalized_entropy(v) for v in vals]
    df["effective_rank_topk"] = [M.effective_rank(v) for v in vals]
    kframe = pd.DataFrame([k_metrics(v, top_k) for v in vals], columns=list(k_columns(top_k)),
                          index=df.index)
    return pd.concat([df, kframe], axis=1)


def _nulls_table(loaded: dict[str, Deltas], names: dict[str, list[str]],
                 every: Mapping[tuple[str, int], Any], r: int) -> pd.DataFrame:
    """The K-resolved metrics of every compared module's nulls: one row per (label, run, module,
    null kind); run j's draws are seeded by j. A full-rank update is projected at rank ``r`` when
    some compared update is factored (an adapter)."""
    project = any(loaded[key][n].is_factored for key, ns in names.items() for n in ns)
    rows = []
    for (label, j), source in every.items():
        key = f"{label}#{j}"
        deltas: Mapping[str, Delta] = {n: loaded[key][n] for n in names[key]}
        spectra = null_spectra(deltas, j, project_rank=r if project else None, source=source)
        rows += [{"label": label, "run": j, "module": module, "null": kind, **k_metrics(s, r)}
                 for kind, per in spectra.items() if kind in NULL_KINDS for module, s in per.items()]
    return pd.DataFrame(rows, columns=["label", "run", "module", "null", *k_columns(r)])


def common_rank(loaded: dict[str, Deltas], names: dict[str, list[str]]) -> int:
    """The smallest structural rank among the compared modules (every K stays at or below it)."""
    return max(1, min(loaded[label][n].rank_bound for label, ns in names.items() for n in ns))


def fair_k(bounds: Sequence[int], dims: Sequence[int]) -> int:
    """The K of the report's fair entropy: the smallest structural rank among the compared
    modules (``bounds``), within their smallest dimension (``dims``), at least 2 (1 when a
    module is a vector).

    >>> fair_k([16, 4096], [4096, 4096]), fair_k([1], [8]), fair_k([3], [1])
    (16, 2, 1)
    """
    if not dims or min(dims) < 2:
        return 1
    return max(2, min(min(bounds), min(dims)))


def common_top_k(loaded: dict[str, Deltas], names: dict[str, list[str]]) -> int:
    """The common K (:func:`fair_k`) of the modules ``names`` of the ``loaded`` updates."""
    return fair_k([loaded[label][n].rank_bound for label, ns in names.items() for n in ns],
                  [min(loaded[label][n].shape) for label, ns in names.items() for n in ns])


def _metrics(labels: list[str], frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    df = pd.concat([f.assign(label=label) for label, f in frames.items()], ignore_index=True)
    df["label"] = pd.Categorical(df["label"], categories=labels, ordered=True)
    df["kind"] = pd.Categorical(df["kind"].astype(str), categories=kind_order(df["kind"].astype(str)),
                                ordered=True)
    first = ["label", "module", "layer", "kind", "method", "shape", "rank_bound",
             "normalized_entropy", "normalized_entropy_topk", "effective_rank", "effective_rank_topk",
             "run"]
    return df[first + [c for c in df.columns if c not in first]]


def _normalised(sp: Spectrum) -> tuple[np.ndarray, np.ndarray]:
    """σᵢ/σ₁ (NaN beyond the numerical rank) and the cumulative energy share, as numpy arrays."""
    s = sp.values.to(torch.float64).numpy()
    if s.size == 0 or s[0] <= 0:
        return np.full(s.size, np.nan), np.full(s.size, np.nan)
    norm = s / s[0]
    norm[M.numerical_rank(sp.values, sp.shape):] = np.nan
    energy = np.cumsum(s**2) / np.sum(s**2)
    return norm, energy


def _band(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns beyond every rank
        lo, mid, hi = np.nanquantile(stack, [BAND[0], 0.5, BAND[1]], axis=0)
    return mid, lo, hi


def _pad(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, (0, width - a.size), constant_values=np.nan)


def spectra_table(metrics: pd.DataFrame, raw: dict[str, dict[str, Spectrum]]) -> pd.DataFrame:
    """Per (label, kind, i): median and 10–90 % band across layers of σᵢ/σ₁ and of the energy."""
    parts = []
    for (label, kind), group in metrics.groupby(["label", "kind"], observed=True, sort=True):
        pairs = [_normalised(raw[str(label)][spectrum_key(m, int(r))])
                 for m, r in zip(group["module"], group["run"], strict=True)]
        width = max(p[0].size for p in pairs)
        norm = np.vstack([_pad(p[0], width) for p in pairs])
        energy = np.vstack([_pad(p[1], width) for p in pairs])
        n_mid, n_lo, n_hi = _band(norm)
        e_mid, e_lo, e_hi = _band(energy)
        parts.append(pd.DataFrame({
            "label": label, "kind": kind, "i": np.arange(1, width + 1),
            "sigma_norm": n_mid, "sigma_norm_lo": n_lo, "sigma_norm_hi": n_hi,
            "energy": e_mid, "energy_lo": e_lo, "energy_hi": e_hi, "modules": len(pairs)}))
    df = pd.concat(parts, ignore_index=True)
    df["label"] = pd.Categorical(df["label"], categories=metrics["label"].cat.categories, ordered=True)
    df["kind"] = pd.Categorical(df["kind"], categories=metrics["kind"].cat.categories, ordered=True)
    return df.astype({"i": "int64", "modules": "int64"})


def _load_all(every: Mapping[tuple[str, int], Any], base: Any, opts: Options) -> dict[str, Deltas]:
    """Every run of every label (key ``label#j``), planned as one collection and checked to be
    updates of one base."""
    plan = build(Request(tuple(every.values()), base, opts, collection=True))
    loaded = {f"{lb}#{j}": load_side(side, opts)
              for (lb, j), side in zip(every, plan.sides, strict=True)}
    _check_shapes(loaded, {f"{lb}#{j}": describe(p) for (lb, j), p in every.items()})
    return loaded


def collect(updates: Mapping[str, str | Path | Sequence[str | Path]],
            base: str | Path | None = None, *, top_k: int | None = None,
            module: str | None = None, options: Options | None = None,
            **kwargs: Any) -> ReportData:
    """Analyse labelled updates of one base and build the report's tables.

    Args:
        updates: label → checkpoint folder (PEFT adapter, MultiLoRA folder, full checkpoint),
            Hub id, or live object (PeftModel, nn.Module, state dict); or a list of them:
            several runs (seeds) of that method.
        base: the base model folder: needed for full checkpoints; when given, every update must
            pair with it.
        top_k: the common K of the fair entropy; default: the smallest structural rank compared.
        module: the module of the heatmaps (default: the first kind of the middle layer).
        options: the analysis options (:class:`~deltaspec.options.Options`: ``k`` is the K of
            φ(K, K) and the heatmaps, ``include`` a regex on module names, device, progress;
            ``intruders`` off by default — the report does not draw them), or give them as
            keyword arguments.
    """
    labels = [str(x) for x in updates]
    check_labels(labels)
    if top_k is not None and top_k < 1:
        raise UsageError("top_k must be a positive integer")
    opts = options if options is not None else make_options(kwargs, public=True)
    if options is not None and kwargs:
        opts = dataclasses.replace(options, **kwargs)
    opts = dataclasses.replace(opts, vectors=True, keep_spectra=True)
    runs = _runs(updates)
    paths = {label: ", ".join(describe(x) for x in r) for label, r in runs.items()}
    every = {(label, j): p for label, r in runs.items() for j, p in enumerate(r)}
    loaded_all = _load_all(every, base, opts)
    names_all, only_all = _common(loaded_all, opts.include)
    names = {label: names_all[f"{label}#0"] for label in labels}
    only = {label: only_all[f"{label}#0"] for label in labels}
    kk = cap_k(top_k if top_k is not None else common_top_k(loaded_all, names_all),
               common_rank(loaded_all, names_all), "top_k")
    frames: dict[str, pd.DataFrame] = {}
    raw: dict[str, dict[str, Spectrum]] = {label: {} for label in labels}
    chosen_opts = dataclasses.replace(opts, include=None)  # the common modules are chosen already
    for label, j in every:
        key = f"{label}#{j}"
        result = run(loaded_all[key], opts=chosen_opts, modules=names_all[key])
        raw[label] |= {spectrum_key(m, j): sp for m, sp in result.spectra.items()}
        part = _topk_columns(result.frame(), result.spectra, kk).assign(run=j)
        frames[label] = part if j == 0 else pd.concat([frames[label], part], ignore_index=True)
    k = opts.k
    metrics = _metrics(labels, frames)
    metrics.attrs["top_k"] = kk
    similarity = similarity_table(labels, names, raw, k)
    similarity.attrs["k"] = k
    chosen = pick_module(names[labels[0]], module)
    return ReportData(
        labels=labels, paths=paths, base=None if base is None else describe(base), k=k, top_k=kk,
        metrics=metrics, spectra=spectra_table(metrics, raw),
        similarity=similarity,
        grids=similarity_grids(labels, names, raw, chosen, k) if len(labels) > 1 else [],
        module=chosen, only_in={lb: v for lb, v in only.items() if v}, raw=raw, runs=runs,
        nulls=_nulls_table(loaded_all, names_all, every, kk))


__all__ = ["ReportData", "SimilarityGrid", "check_labels", "collect", "common_rank", "common_top_k",
           "fair_k", "kind_order", "parse_updates", "pick_module", "similarity_grids", "similarity_table",
           "spectra_table", "spectrum_key"]
