"""Many updates of one base at once (``deltaspec zoo``): pairwise similarity per module, an N×N
whole-model matrix, clusters, a shared-basis curve and the modules that vary most.

One pass over the files: modules are streamed one at a time across the N updates (memory: one
module's factors of all N, the next one read on a worker thread meanwhile), each solved by
:func:`deltaspec.engine.collection.module_stats` — batched QRs and all-pairs products on the GPU
when there is one — and never a dense ΔW for a factored update. Under ``torchrun`` the modules are
shared across ranks by estimated cost, like ``analyze`` (:mod:`deltaspec.engine.distributed`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from deltaspec.collection.sources import labelled, load_all
from deltaspec.collection.tables import build_tables
from deltaspec.delta import Delta
from deltaspec.engine import distributed
from deltaspec.engine.collection import Member, ModuleStats, module_stats
from deltaspec.engine.pipeline import prefetch
from deltaspec.engine.spectrum import resolve_device, route
from deltaspec.loaders import Deltas
from deltaspec.loaders.sources.live import describe
from deltaspec.metrics.collection import Clusters
from deltaspec.options import Options, make_options


@dataclass(frozen=True)
class ZooResult:
    """What :func:`zoo` returns. Tables (pandas):

    - ``pairs``: one row per (a, b, module), a before b: ``cosine`` (gauge-invariant Frobenius
      cosine), ``subspace_similarity_left``/``_right`` (φ at K), ``min_angle_degrees_left``/
      ``_right``, ``k`` and the chance level of φ for random subspaces of that size
      (``chance_left`` = K/m, ``chance_right`` = K/n);
    - ``matrix``: one row per ordered pair (a, b), diagonal included: the whole-model ``cosine`` of
      the concatenated updates and the mean φ over modules (``phi_left``, ``phi_right``);
    - ``clusters``: per update its dendrogram position and suggested group;
    - ``basis``: the shared-basis curve per module kind and side: energy of all N updates kept
      by the top-d directions of the collection (median and 10–90 % band across layers);
    - ``modules``: per module its spread across the collection (mean |cosine|, norm CV, φ, and
      the d keeping 90 % / 99 % of the energy with one shared basis).
    """

    labels: list[str]
    sources: dict[str, str]
    k: int
    pairs: pd.DataFrame
    matrix: pd.DataFrame
    clusters: pd.DataFrame
    basis: pd.DataFrame
    modules: pd.DataFrame
    tree: Clusters
    notes: list[str] = field(default_factory=list)

    def cosine_matrix(self) -> pd.DataFrame:
        """The N×N whole-model cosine as a square frame, in dendrogram order."""
        order = [self.labels[i] for i in self.tree.order]
        sq = self.matrix.pivot(index="a", columns="b", values="cosine")
        return sq.loc[order, order]


def member(d: Delta) -> Member:
    """One update of one module for the collection math: its factors when the engine solves it
    through them, else its dense matrix (full fine-tunes, structured adapters)."""
    if route(d) == "factored":
        b, a = d.factors(torch.float32)
        return Member(b=b, a=a)
    return Member(dense=d.dense(torch.float64))


def _cost(d: Delta, n: int) -> float:
    """Estimated flops of one module over n updates (for sharing modules across ranks)."""
    m, w = d.shape
    r = n * (d.rank_bound if route(d) == "factored" else min(m, w))
    return float((m + w) * r * r + 2 * r ** 3)


def solve(loaded: Mapping[str, Deltas], names: Mapping[str, list[str]], opts: Options
          ) -> dict[str, ModuleStats]:
    """Module (the first update's name) → its :class:`ModuleStats`, streamed module by module;
    under ``torchrun`` each rank solves its share and every rank gets the whole."""
    labels = list(loaded)
    first = names[labels[0]]
    world = distributed.current(opts.device)
    device = resolve_device(world.device(opts.device) if world.distributed else opts.device)

    def read(i: int) -> list[Member]:
        return [member(loaded[label][names[label][i]]) for label in labels]

    def compute(mine: list[int]) -> dict[str, ModuleStats]:
        out = {}
        it: Any = zip(mine, prefetch(mine, read, depth=1), strict=True)
        if opts.progress and (not world.distributed or world.is_writer):
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(mine), desc="zoo", unit="module", leave=False)
        for i, members in it:
            world.poll()
            d = loaded[labels[0]][first[i]]
            out[first[i]] = module_stats(members, d.shape, opts.k, device)
        return out

    if not world.distributed:
        return compute(list(range(len(first))))
    costs = [_cost(loaded[labels[0]][n], len(labels)) for n in first]
    merged: dict[str, ModuleStats] = {}
    for _, part in distributed.run_sharded(world, costs, compute):
        merged.update(part)
    return {n: merged[n] for n in first}


def run(updates: Mapping[str, Any], base: Any = None, opts: Options | None = None) -> ZooResult:
    """The core entry: labelled updates (label → folder, Hub id or live object) → ZooResult."""
    opts = opts or Options()
    loaded, names, notes = load_all(updates, base, opts)
    stats = solve(loaded, names, opts)
    shapes = {n: loaded[next(iter(loaded))][n].shape for n in stats}
    tables = build_tables(list(loaded), stats, shapes)
    tables["notes"] = notes + tables["notes"]
    return ZooResult(list(loaded), {lb: describe(s) for lb, s in updates.items()}, opts.k, **tables)


def zoo(sources: Sequence[Any] | Mapping[str, Any], base: Any = None, **options: Any) -> ZooResult:
    """Similarity, clusters and a shared basis of many updates of one base.

    Args:
        sources: two or more updates: a list of folders / Hub ids (labelled by their last path
            components, as few as make them distinct), or a mapping label → folder, Hub id or
            live object. Any mix of formats deltaspec reads; full fine-tunes need ``base``.
        base: the base model, for full fine-tunes (every update must pair with it).
        **options: :class:`~deltaspec.options.Options` fields — ``k`` (the K of φ and the angles,
            default 8), ``include``, ``device``, ``progress``, ….

    Returns:
        A :class:`ZooResult` (its tables are pandas DataFrames).
    """
    opts = make_options(options, public=True)
    return run(labelled(sources), base, opts)


__all__ = ["ZooResult", "member", "run", "solve", "zoo"]
