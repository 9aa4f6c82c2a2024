"""The torch executor of a :class:`~deltaspec.plan.Plan` and the one loop over modules.

:func:`run_plan` loads each side of a plan once (:func:`deltaspec.loaders.registry.load_side`)
and runs :func:`run`: already-loaded deltas (one side, or two to compare), one
:class:`~deltaspec.options.Options` and an optional module list → the typed
:class:`~deltaspec.result.Analysis`. Every command reaches it through
:func:`deltaspec.execute.execute`; rows come from the one row builder (:mod:`deltaspec.rows`),
modules are paired by the plan's one :func:`~deltaspec.plan.pair`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from deltaspec import columns as cols
from deltaspec import rows as R
from deltaspec.delta import Delta
from deltaspec.engine import distributed
from deltaspec.engine.pipeline import Solved, shard, solve_stream
from deltaspec.engine.spectrum import resolve_device
from deltaspec.options import Options
from deltaspec.output import Rows
from deltaspec.plan import check_shapes, one_sided, pair
from deltaspec.result import Analysis

if TYPE_CHECKING:
    from deltaspec.plan import Plan

Item = tuple[str, ...]  # one module name per side
SIGMA = "__sigma__"  # a row's singular values (not a column: taken out before the table is made)


def has_base(*sides: Mapping[str, Delta]) -> bool:
    """Is there a base — the one rule: every side has a base weight for some module."""
    return bool(sides) and all(any(d.base is not None for d in s.values()) for s in sides)


def select(a: Mapping[str, Delta], b: Mapping[str, Delta] | None, opts: Options,
           modules: Sequence[str] | None = None,
           names: tuple[str, str] = ("A", "B")) -> tuple[list[Item], list[str], list[str]]:
    """Module selection and order: (items, only in A, only in B) — the plan's one pairing
    (:func:`deltaspec.plan.pair`), the shapes checked, then ``opts.shard`` = (rank, world): this
    process's share, last."""
    sides = [list(a)] if b is None else [list(a), list(b)]
    items = pair(sides, opts.include, modules, names[: len(sides)])
    only_a, only_b = [], []
    if b is not None:
        check_shapes([{n: d.shape for n, d in a.items()}, {n: d.shape for n, d in b.items()}],
                     items, names)
        unpaired = pair(sides, None, modules, names)  # one-sided modules: before the filter
        if modules is None:
            only_a, only_b = one_sided(sides, unpaired)
    if opts.shard:
        mine = set(shard([it[0] for it in items], *opts.shard))
        items = [it for it in items if it[0] in mine]
    return items, only_a, only_b


def run_plan(plan: Plan, *, metrics: bool = True, modules: Sequence[str] | None = None,
             vectors_k: int | None = None) -> Analysis:
    """Execute ``plan`` with torch: load each side once, then :func:`run`."""
    from deltaspec.loaders.registry import load_side

    loaded = [load_side(s, plan.options) for s in plan.sides]
    b = loaded[1] if len(loaded) == 2 else None
    names = (plan.names + ("B",))[:2]
    out = run(loaded[0], b, plan.options, modules, metrics=metrics, names=(names[0], names[1]),
              vectors_k=vectors_k)
    return dataclasses.replace(out, executor=plan.reason)


def run(a: Mapping[str, Delta], b: Mapping[str, Delta] | None = None,
        opts: Options | None = None, modules: Sequence[str] | None = None, *,
        metrics: bool = True, names: tuple[str, str] = ("A", "B"),
        vectors_k: int | None = None) -> Analysis:
    """The core loop: analyse ``a`` (or compare ``a`` with ``b``) module by module.

    Args:
        a, b: loaded deltas (:func:`deltaspec.load`); ``b`` for a comparison.
        opts: the options (defaults: :class:`Options`).
        modules: analyse exactly these modules (names of ``a``), in this order.
        metrics: False → spectra only, no table columns beyond the identity (``deltaspec.spectra``).
        names: how errors name the two sides.
        vectors_k: top vectors per side to compute (default: K where a metric or
            ``opts.vectors`` needs them; -1: all).
    """
    opts = opts or Options()
    sides = [a] if b is None else [a, b]
    with_base = metrics and has_base(*sides)
    items, only_a, only_b = select(a, b, opts, modules, names)
    if vectors_k is None:
        need = opts.vectors or (metrics and (with_base or b is not None))
        vectors_k = opts.k if need else 0
    done = _solve_rows(sides, items, opts, vectors_k, with_base, metrics)
    rows = {n: r for n, (r, _) in done.items()}
    spectra = {n: sp for n, (_, sp) in done.items() if sp is not None}
    sigmas = {n: r.pop(SIGMA) for n, r in rows.items() if SIGMA in r}
    order = [it[0] for it in items]
    ht = opts.heavy_tail
    columns = (cols.analyze_columns(with_base, ht) if b is None else
               cols.compare_columns(with_base, ht)) if metrics else list(cols.IDENTITY)
    skipped = list(getattr(a, "skipped", [])) + list(getattr(b, "skipped", []) if b else [])
    notes = list(dict.fromkeys([*getattr(a, "notes", []), *(getattr(b, "notes", []) if b else [])]))
    if metrics and b is None:
        notes += R.untrained_notes([rows[n] for n in order])
    return Analysis(Rows([rows[n] for n in order], columns),
                    {n: spectra[n] for n in order if n in spectra}, skipped, only_a, only_b,
                    with_base, {n: sigmas[n] for n in order if n in sigmas}, notes, k=opts.k)


def _solve_rows(sides: list[Mapping[str, Delta]], items: list[Item], opts: Options,
                vectors_k: int, with_base: bool,
                metrics: bool) -> dict[str, tuple[dict[str, Any], Any]]:
    """Module name → (row, spectrum or None) for every item. Under ``torchrun`` (or inside a
    process group) each rank solves its share by cost and every rank gets the whole back
    (:mod:`deltaspec.engine.distributed`); the rows equal a single-process run's."""
    world = distributed.current(opts.device)
    if world.distributed:
        opts = dataclasses.replace(opts, device=world.device(opts.device),
                                   progress=opts.progress and world.is_writer)
    pair_ = len(sides) == 2

    def compute(mine: Sequence[Item]) -> dict[str, tuple[dict[str, Any], Any]]:
        out = {}
        for s in _stream(sides, mine, opts, vectors_k, with_base, "compare" if pair_ else "analyze"):
            world.poll()  # another rank failed: stop at this module
            if not metrics:
                row = R.identity(s.deltas[0])
            else:
                row = R.compare_row(s, opts, with_base) if pair_ else R.row(s, opts, with_base)
            keep = opts.keep_spectra or not metrics
            sp = (s.spectra[0], s.spectra[1]) if pair_ else s.spectra[0]
            if metrics:  # values only, fresh arrays (travel with the row): figures draw from them
                row[SIGMA] = (R.sigma(s.spectra[0]), R.sigma(s.spectra[1])) if pair_ \
                    else R.sigma(s.spectra[0])
            out[s.deltas[0].name] = (row, sp if keep else None)
        return out

    if not world.distributed:
        return compute(items)
    return distributed.run_items(world, sides, items, with_base, vectors_k, compute)


def _stream(sides: list[Mapping[str, Delta]], items: Sequence[Item], opts: Options, vectors_k: int,
            with_base: bool, what: str) -> Iterator[Solved]:
    """Modules read and moved to the device on a worker thread while the previous ones are
    solved here; factored modules of one shape solved in batches (order: by job)."""
    it = solve_stream(sides, items, resolve_device(opts.device), vectors_k, with_base)
    if not opts.progress:
        return it
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=len(items), desc=what, unit="module", leave=False))


__all__ = ["Item", "has_base", "run", "run_plan", "select"]
