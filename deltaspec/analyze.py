"""The only loop over modules. :func:`run` is the core entry: already-loaded deltas (one side, or
two to compare), one :class:`~deltaspec.options.Options` and an optional module list → a typed
:class:`Analysis`. ``analyze``/``compare``/``spectra`` (the public API), the report, the CI gate
(snapshot, check, ``deltaspec.testing``) and the CLI all go through it; each loads every
checkpoint once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from deltaspec import columns as cols
from deltaspec import frames, patterns
from deltaspec import metrics as M
from deltaspec.delta import Delta
from deltaspec.engine import distributed, health, relative
from deltaspec.engine.kernels import Operand
from deltaspec.engine.pipeline import Solved, shard, solve_stream
from deltaspec.engine.spectrum import Spectrum, completed, resolve_device, route
from deltaspec.errors import DeltaspecError, ShapeError
from deltaspec.loaders import Deltas, detect_format, load
from deltaspec.loaders.live import describe
from deltaspec.names import match_key
from deltaspec.options import Options, make_options

INTRUDER_TOP = 10  # Shuttleworth et al. look at the top-10 singular vectors of W + ΔW
Item = tuple[str, ...]  # one module name per side
SIGMA = "__sigma__"  # a row's singular values (not a column: taken out before the table is made)


@dataclass(frozen=True)
class Analysis:
    """What the core entry returns.

    ``table``: one row per module (:mod:`deltaspec.columns`); ``spectra``: module (A's name) →
    its :class:`Spectrum`, or (A's, B's) in a comparison — filled with ``keep_spectra``;
    ``skipped``: (tensor, reason) the loaders passed over; ``only_a``/``only_b``: modules of one
    side only (a comparison); ``with_base``: whether base-relative metrics were computed.
    """

    table: pd.DataFrame
    spectra: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    with_base: bool = False
    sigmas: dict[str, Any] = field(default_factory=dict)  # module → σ (or (σ_A, σ_B)), numpy
    notes: list[str] = field(default_factory=list)  # the loaders' remarks (e.g. an unsaved α)


def has_base(*sides: Mapping[str, Delta]) -> bool:
    """Is there a base — the one rule: every side has a base weight for some module."""
    return bool(sides) and all(any(d.base is not None for d in s.values()) for s in sides)


def select(a: Mapping[str, Delta], b: Mapping[str, Delta] | None, opts: Options,
           modules: Sequence[str] | None = None,
           names: tuple[str, str] = ("A", "B")) -> tuple[list[Item], list[str], list[str]]:
    """Module selection and order, in one place: (items, only in A, only in B).

    Items follow ``modules`` when given (names of A, any prefix spelling), else A's order; B's
    modules pair with A's by name (:func:`deltaspec.names.match_key`); ``opts.include`` filters
    on A's names; ``opts.shard`` = (rank, world) takes this process's share, last.
    """
    if modules is not None:
        by_key = {match_key(n): n for n in a}
        missing = [m for m in modules if match_key(m) not in by_key]
        if missing:
            raise DeltaspecError(f"module {missing[0]!r} is not in {names[0]} "
                                 f"(e.g. {', '.join(list(a)[:3])})")
        order = list(dict.fromkeys(by_key[match_key(m)] for m in modules))
    else:
        order = list(a)
    only_a: list[str] = []
    only_b: list[str] = []
    if b is None:
        items: list[Item] = [(n,) for n in order]
    else:
        b_key = {match_key(n): n for n in b}
        items = [(n, b_key[match_key(n)]) for n in order if match_key(n) in b_key]
        for na, nb in items:
            if a[na].shape != b[nb].shape:
                raise ShapeError(f"module {na!r}: shape {a[na].shape} in {names[0]} but "
                                 f"{b[nb].shape} in {names[1]}")
        if not items:
            raise DeltaspecError(f"{names[0]} and {names[1]} have no module in common")
        paired = {nb for _, nb in items}
        only_a = sorted(set(a) - {na for na, _ in items}) if modules is None else []
        only_b = sorted(set(b) - paired) if modules is None else []
    if opts.include:
        items = [it for it in items if patterns.search(opts.include, it[0], "include")]
    if opts.shard:
        mine = set(shard([it[0] for it in items], *opts.shard))
        items = [it for it in items if it[0] in mine]
    return items, only_a, only_b


def run(a: Mapping[str, Delta], b: Mapping[str, Delta] | None = None,
        opts: Options | None = None, modules: Sequence[str] | None = None, *,
        metrics: bool = True, names: tuple[str, str] = ("A", "B"),
        vectors_k: int | None = None) -> Analysis:
    """The core entry: analyse ``a`` (or compare ``a`` with ``b``) module by module.

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
    if metrics and b is None and (note := M.untrained_note([rows[n] for n in order])):
        notes.append(note)
    return Analysis(cols.frame([rows[n] for n in order], columns),
                    {n: spectra[n] for n in order if n in spectra}, skipped, only_a, only_b,
                    with_base, {n: sigmas[n] for n in order if n in sigmas}, notes)


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
    pair = len(sides) == 2

    def compute(mine: Sequence[Item]) -> dict[str, tuple[dict[str, Any], Any]]:
        out = {}
        for s in _stream(sides, mine, opts, vectors_k, with_base, "compare" if pair else "analyze"):
            world.poll()  # another rank failed: stop at this module
            if not metrics:
                row = _identity(s.deltas[0])
            else:
                row = _compare_row(s, opts, with_base) if pair else _row(s, opts, with_base)
            keep = opts.keep_spectra or not metrics
            sp = (s.spectra[0], s.spectra[1]) if pair else s.spectra[0]
            if metrics:  # values only, fresh arrays (travel with the row): figures draw from them
                row[SIGMA] = (frames.sigma(s.spectra[0]), frames.sigma(s.spectra[1])) if pair \
                    else frames.sigma(s.spectra[0])
            out[s.deltas[0].name] = (row, sp if keep else None)
        return out

    if not world.distributed:
        return compute(items)
    return distributed.run_items(world, sides, items, with_base, vectors_k, compute)


def _identity(d: Delta) -> dict[str, Any]:
    return cols.identity(d.name, d.method, d.shape, d.rank_bound, route(d))


def _base_metrics(sp: Spectrum, fro: float, op: Operand, w: Operand, opts: Options,
                  eigs: relative.BaseEigs) -> dict[str, Any]:
    """relative_norm, amplification, intruders: the metric functions of
    :mod:`deltaspec.metrics.base_relative` fed the reductions of W they need, formed blockwise by
    the engine (‖W‖_F, the r×r projection U_rᵀ·W·V_r), so W is never copied to float64 whole."""
    w_fro = math.sqrt(w.fro2())
    if not math.isfinite(w_fro):
        w.check_finite()
    r = min(opts.k, M.numerical_rank(sp.values, sp.shape))
    u, v = sp.U, sp.V
    proj = relative.projection(w, u[:, :r], v[:, :r]) if r and u is not None and v is not None \
        else torch.zeros(0, 0)
    return {"relative_norm": M.relative_norm(fro, w_fro), "amplification": M.amplification(fro, proj),
            "intruders": _intruders(sp, op, w, eigs) if opts.intruders else math.nan}


def _intruders(sp: Spectrum, op: Operand, w: Operand, eigs: relative.BaseEigs) -> int:
    """Intruder dimensions of W + ΔW against W: ``relative.intruder_cosines`` gives C = |U_Wᵀ·u_t|
    without forming U_W, and :func:`deltaspec.metrics.intruders` counts over it. ``eigs``: W's
    decompositions already made (a compare's two sides share their base's)."""
    if op.is_zero():
        return 0
    cos = relative.intruder_cosines(w, w.plus(op), INTRUDER_TOP, hint=(sp.U, sp.V), eig=eigs.of(w),
                                    shift=float(sp.values[0]))
    return M.intruders(cos.to("cpu"))


def _stream(sides: list[Mapping[str, Delta]], items: Sequence[Item], opts: Options, vectors_k: int,
            with_base: bool, what: str) -> Iterator[Solved]:
    """Modules read and moved to the device on a worker thread while the previous ones are
    solved here; factored modules of one shape solved in batches (order: by job)."""
    it = solve_stream(sides, items, resolve_device(opts.device), vectors_k, with_base)
    if not opts.progress:
        return it
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=len(items), desc=what, unit="module", leave=False))


def _side_metrics(s: Solved, i: int, opts: Options, with_base: bool,
                  eigs: relative.BaseEigs) -> dict[str, Any]:
    sp, w = s.spectra[i], s.bases[i]
    part = M.spectral_metrics(sp.values, sp.shape, opts.top_k, s.deltas[i].rank_bound)
    if with_base and w is not None:
        part |= _base_metrics(sp, M.fro_norm(sp.values), s.ops[i], w, opts, eigs)
    return part | health.row_columns(sp, s.ops[i], w if with_base else None, opts, eigs)


def _row(s: Solved, opts: Options, with_base: bool) -> dict[str, Any]:
    return _identity(s.deltas[0]) | _side_metrics(s, 0, opts, with_base, relative.BaseEigs())


def _compare_row(s: Solved, opts: Options, with_base: bool) -> dict[str, Any]:
    ident = _identity(s.deltas[0])
    row: dict[str, Any] = {c: ident[c] for c in cols.IDENTITY if c not in cols.PER_SIDE_IDENTITY}
    eigs = relative.BaseEigs()  # one eigh of W when both sides have the same base
    for i, side in enumerate(("a", "b")):
        d = s.deltas[i]
        part = {"method": d.method, "rank_bound": d.rank_bound, "route": route(d)}
        part |= _side_metrics(s, i, opts, with_base, eigs)
        row |= {f"{c}_{side}": v for c, v in part.items()}
    return row | _pairwise(s, opts.k)


def _pairwise(s: Solved, k: int) -> dict[str, float]:
    (sa, sb), (op_a, op_b) = s.spectra, s.ops
    ra = min(k, M.numerical_rank(sa.values, sa.shape))
    rb = min(k, M.numerical_rank(sb.values, sb.shape))
    assert sa.U is not None and sb.U is not None and sa.V is not None and sb.V is not None
    ua, ub, va, vb = sa.U[:, :ra], sb.U[:, :rb], sa.V[:, :ra], sb.V[:, :rb]
    fa, fb = M.fro_norm(sa.values), M.fro_norm(sb.values)
    inner = relative.frobenius_inner(op_a, op_b) if fa > 0 and fb > 0 else 0.0
    return {
        "cosine": M.cosine(inner, fa, fb),
        "subspace_sim_left": M.subspace_similarity(ua, ub),
        "subspace_sim_right": M.subspace_similarity(va, vb),
        "min_angle_left": M.min_angle_degrees(ua, ub),
        "min_angle_right": M.min_angle_degrees(va, vb),
    }


def _public(result: Analysis, opts: Options) -> pd.DataFrame:
    """The table the public functions return; skipped tensors and one-sided modules in ``attrs``
    (informational: the library itself never reads them back), and the singular values the
    figures draw (:mod:`deltaspec.frames`)."""
    df = frames.attach(result.table, result.sigmas, opts.k)
    df.attrs["skipped"] = list(result.skipped)
    df.attrs["notes"] = list(result.notes)
    if result.only_a or result.only_b:
        df.attrs["only_a"], df.attrs["only_b"] = list(result.only_a), list(result.only_b)
    return df


def _load(path: Any, base: Any, opts: Options, config: Any = None) -> Deltas:
    return load(path, base, allow_modified_base=opts.allow_modified_base,
                discover_base=opts.discover_base, lora_alpha=opts.lora_alpha,
                mtl_temperature=opts.mtl_temperature, revision=opts.revision, config=config,
                adapter_name=opts.adapter_name)


def run_paths(a: Any, b: Any = None, base: Any = None, opts: Options | None = None, *,
              config: Any = None) -> Analysis:
    """Load the update(s) at ``a`` (and ``b``) once and run :func:`run` on them — with
    ``compare``'s rule: two full checkpoints and no base are the one update ΔW = b − a. Each is a
    folder, a Hub id or a live object (:func:`deltaspec.load`); ``config``: the adapter config of
    an adapter state dict ``a``."""
    opts = opts or Options()
    if b is None:
        return run(_load(a, base, opts, config), opts=opts)
    if base is None and detect_format(a) == detect_format(b) == "full":
        return run(_load(b, a, opts), opts=opts)
    return run(_load(a, base, opts), _load(b, base, opts), opts, names=(describe(a), describe(b)))


def analyze(path: Any, base: Any = None, *, config: Any = None, **options: Any) -> pd.DataFrame:
    """One row of metrics per module of the update at ``path`` (options: :class:`Options`).

    ``path``: a folder, a Hub id ``org/name[@rev]``, or a live object — a PeftModel, an
    ``nn.Module`` or state dict of a full model (with ``base``), a PEFT adapter state dict (with
    ``config``). Columns are defined in :mod:`deltaspec.columns`: identity (module, layer, kind,
    method, shape, rank_bound), every spectral metric, and with a base the base-relative ones.
    The singular values travel in ``df.attrs["spectra"]`` for :mod:`deltaspec.plots`.
    """
    opts = make_options(options, public=True)
    return _public(run_paths(path, None, base, opts, config=config), opts)


def compare(a: Any, b: Any, base: Any = None,
            **options: Any) -> pd.DataFrame:
    """One row per module common to updates ``a`` and ``b``: both sides' metrics (suffixes
    ``_a``/``_b``) and the pairwise ones (cosine, subspace similarity at K, principal angles).

    Each side is an adapter folder, or a full checkpoint (then ``base`` is required). When both
    are full checkpoints and no base is given, the update is ΔW = b − a, analysed like ``analyze``.
    """
    opts = make_options(options, public=True)
    return _public(run_paths(a, b, base, opts), opts)


def spectra(path: Any, base: Any = None, k: int | None = None,
            vectors: bool = False, **options: Any) -> dict[str, Spectrum]:
    """Module name → :class:`Spectrum` of the update at ``path`` (values, and top-k vectors)."""
    opts = make_options(options, public=True)
    # k=None with vectors: every vector (the engine's -1); else the top k values (and vectors)
    opts = dataclasses.replace(opts, vectors=vectors, k=opts.k if k is None else k)
    out = run(_load(path, base, opts), opts=opts, metrics=False, vectors_k=-1 if (
        vectors and k is None) else None).spectra
    if k is None:
        return out
    return {n: completed(Spectrum(sp.values[:k], sp.shape, sp.route, sp.U, sp.V))
            for n, sp in out.items()}


__all__ = ["Analysis", "Options", "analyze", "compare", "has_base", "run", "run_paths", "select",
           "spectra"]
