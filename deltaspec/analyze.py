"""The only loop over modules: ``analyze`` (one update) and ``compare`` (two) → pandas.DataFrame."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from deltaspec import columns as cols
from deltaspec import metrics as M
from deltaspec.delta import Delta
from deltaspec.engine import relative
from deltaspec.engine.kernels import Operand
from deltaspec.engine.pipeline import Solved, shard, solve_stream
from deltaspec.engine.spectrum import Spectrum, resolve_device
from deltaspec.errors import DeltaspecError, ShapeError, UsageError
from deltaspec.loaders import Deltas, detect_format, load
from deltaspec.names import kind_of, layer_of, match_key

INTRUDER_TOP = 10  # Shuttleworth et al. look at the top-10 singular vectors of W + ΔW


@dataclass(frozen=True)
class Options:
    """Options of ``analyze``/``compare`` (keyword arguments of the same names)."""

    top_k: int | None = None  # spectral metrics over the top K values only (fair across ranks)
    k: int = 8  # subspace dimension K for similarity and amplification
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", …
    intruders: bool = True  # needs the base's singular vectors: turn off on very large models
    include: str | None = None  # regex: only modules whose name matches (re.search)
    progress: bool = False  # a tqdm progress bar on stderr
    allow_modified_base: bool = False  # read PiSSA/OLoRA/… adapters anyway
    shard: tuple[int, int] | None = None  # (rank, world): this process's share of the modules
    keep_spectra: bool = False  # attach spectra (name → Spectrum; compare: (a, b)) as .spectra
    vectors: bool = False  # also compute the top-K singular vectors (kept with keep_spectra)


def make_options(options: dict[str, Any]) -> Options:
    """Validate keyword options into an :class:`Options` (unknown names are an error)."""
    known = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UsageError(f"unknown option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    opts = Options(**options)
    if opts.top_k is not None and opts.top_k < 1:
        raise UsageError(f"top_k must be a positive integer, not {opts.top_k}")
    if opts.k < 1:
        raise UsageError(f"k must be a positive integer, not {opts.k}")
    if opts.include is not None:
        try:
            re.compile(opts.include)
        except re.error as exc:
            raise UsageError(f"include: invalid regular expression {opts.include!r} ({exc})") from None
    return opts


class Result(pd.DataFrame):
    """A DataFrame that may also carry ``.spectra`` and ``.skipped`` (not copied by pandas ops)."""

    _metadata = ["spectra", "skipped"]

    @property
    def _constructor(self) -> type[pd.DataFrame]:
        return pd.DataFrame


def _selected(deltas: dict[str, Delta], opts: Options) -> list[str]:
    names = list(deltas)
    if opts.include:
        names = [n for n in names if re.search(opts.include, n)]
    if opts.shard:
        names = shard(names, *opts.shard)
    return names


def _identity(d: Delta) -> dict[str, Any]:
    return {"module": d.name, "layer": layer_of(d.name), "kind": kind_of(d.name),
            "method": d.method, "shape": f"{d.shape[0]}×{d.shape[1]}", "rank_bound": d.rank_bound}


def _base_metrics(sp: Spectrum, fro: float, op: Operand, w: Operand, opts: Options,
                  eigs: relative.BaseEigs | None = None) -> dict[str, Any]:
    """relative_norm, amplification, intruders. The metric functions take W; they get blockwise
    reductions of it — a 1×1 [‖W‖_F], the r×r projection U_rᵀ·W·V_r with identity vectors — so W
    is never copied to float64 whole (same numbers, flat memory)."""
    f64 = torch.float64
    w_fro = math.sqrt(w.fro2())
    if not math.isfinite(w_fro):
        w.check_finite()
    out: dict[str, Any] = {"relative_norm": M.relative_norm(fro, torch.tensor([[w_fro]], dtype=f64))}
    r = min(opts.k, M.numerical_rank(sp.values, sp.shape))
    if r and sp.U is not None and sp.V is not None:
        proj = sp.U[:, :r].T @ w.mm(sp.V[:, :r]).to("cpu", f64)  # (r, r)
        eye = torch.eye(r, dtype=f64)
        out["amplification"] = M.amplification(fro, proj, eye, eye)
    else:
        out["amplification"] = M.amplification(fro, torch.zeros(0, 0), torch.zeros(0, 0),
                                                torch.zeros(0, 0))
    out["intruders"] = _intruders(sp, op, w, eigs) if opts.intruders else math.nan
    return out


def _intruders(sp: Spectrum, op: Operand, w: Operand, eigs: relative.BaseEigs | None) -> int:
    """Intruder dimensions of W + ΔW against W. ``relative.intruder_cosines`` gives C = |U_Wᵀ·u_t|
    without forming U_W; ``M.intruders(Cᵀ, I)`` counts over exactly that matrix. ``eigs``: W's
    decompositions already made (a compare's two sides share their base's)."""
    if op.is_zero():
        return 0
    eig = eigs.of(w) if eigs is not None else None
    cos = relative.intruder_cosines(w, w.plus(op), INTRUDER_TOP, hint=(sp.U, sp.V), eig=eig)
    cos = cos.to("cpu")
    return M.intruders(cos.T, torch.eye(cos.shape[1], dtype=torch.float64))


def _stream(sides: list[Deltas], items: Sequence[tuple[str, ...]], opts: Options, vectors_k: int,
            with_base: bool, what: str) -> Iterator[Solved]:
    """Modules read and moved to the device on a worker thread while the previous ones are
    solved here; factored modules of one shape solved in batches (order: by job)."""
    it = solve_stream(sides, items, resolve_device(opts.device), vectors_k, with_base)
    if not opts.progress:
        return it
    from tqdm.auto import tqdm

    return iter(tqdm(it, total=len(items), desc=what, unit="module", leave=False))


def _analyze_deltas(deltas: Deltas, opts: Options) -> Result:
    with_base = any(d.base is not None for d in deltas.values())
    names = _selected(deltas, opts)
    rows, spectra = {}, {}
    vectors_k = opts.k if (with_base or opts.vectors) else 0
    for s in _stream([deltas], [(n,) for n in names], opts, vectors_k, with_base, "analyze"):
        d, sp = s.deltas[0], s.spectra[0]
        row = _identity(d) | M.spectral_metrics(sp.values, sp.shape, opts.top_k)
        if with_base and s.bases[0] is not None:
            row |= _base_metrics(sp, M.fro_norm(sp.values), s.ops[0], s.bases[0], opts)
        rows[d.name] = row
        if opts.keep_spectra:
            spectra[d.name] = sp
    spectra = {n: spectra[n] for n in names if n in spectra}
    return _frame([rows[n] for n in names], cols.analyze_columns(with_base), spectra, deltas.skipped)


def _frame(rows: list[dict[str, Any]], columns: list[str], spectra: Mapping[str, object],
           skipped: list[tuple[str, str]]) -> Result:
    df = Result(pd.DataFrame(rows, columns=columns))
    for c in columns:
        if cols.is_integer(c) or c == "layer":
            df[c] = df[c].astype("Int64")
    for c in ("kind", "method", "method_a", "method_b"):
        if c in df:
            df[c] = df[c].astype("string")
    df.spectra = spectra
    df.skipped = skipped
    return df


def analyze(path: str | Path, base: str | Path | None = None, **options: Any) -> pd.DataFrame:
    """One row of metrics per module of the update at ``path`` (see :class:`Options`).

    Columns are defined in :mod:`deltaspec.columns`: identity (module, layer, kind, method, shape,
    rank_bound), every spectral metric, and with a base the base-relative ones.
    """
    opts = make_options(options)
    deltas = load(path, base, allow_modified_base=opts.allow_modified_base)
    return _analyze_deltas(deltas, opts)


def _side(path: str | Path, base: str | Path | None, opts: Options) -> Deltas:
    return load(path, base, allow_modified_base=opts.allow_modified_base)


def _pairs(da: Deltas, db: Deltas) -> list[tuple[str, str]]:
    by_key = {match_key(n): n for n in db}
    pairs = [(n, by_key[match_key(n)]) for n in da if match_key(n) in by_key]
    for na, nb in pairs:
        if da[na].shape != db[nb].shape:
            raise ShapeError(f"module {na!r}: shape {da[na].shape} in A but {db[nb].shape} in B")
    return pairs


def _pairwise(s: Solved, k: int) -> dict[str, float]:
    (sa, sb), (op_a, op_b) = s.spectra, s.ops
    ra = min(k, M.numerical_rank(sa.values, sa.shape))
    rb = min(k, M.numerical_rank(sb.values, sb.shape))
    assert sa.U is not None and sb.U is not None and sa.V is not None and sb.V is not None
    ua, ub, va, vb = sa.U[:, :ra], sb.U[:, :rb], sa.V[:, :ra], sb.V[:, :rb]
    return {
        "cosine": relative.cosine(op_a, op_b, M.fro_norm(sa.values), M.fro_norm(sb.values)),
        "subspace_sim_left": M.subspace_similarity(ua, ub),
        "subspace_sim_right": M.subspace_similarity(va, vb),
        "min_angle_left": M.min_angle_degrees(ua, ub),
        "min_angle_right": M.min_angle_degrees(va, vb),
    }


def compare(a: str | Path, b: str | Path, base: str | Path | None = None,
            **options: Any) -> pd.DataFrame:
    """One row per module common to updates ``a`` and ``b``: both sides' metrics (suffixes
    ``_a``/``_b``) and the pairwise ones (cosine, subspace similarity at K, principal angles).

    Each side is an adapter folder, or a full checkpoint (then ``base`` is required). When both
    are full checkpoints and no base is given, the update is ΔW = b − a, analysed like ``analyze``.
    """
    opts = make_options(options)
    if base is None and detect_format(a) == detect_format(b) == "full":
        return analyze(b, base=a, **options)
    da, db = _side(a, base, opts), _side(b, base, opts)
    pairs = _pairs(da, db)
    if not pairs:
        raise DeltaspecError(f"{a} and {b} have no module in common")
    with_base = base is not None
    keep = set(_selected({na: da[na] for na, _ in pairs}, opts))
    kept = [p for p in pairs if p[0] in keep]
    rows, spectra = {}, {}
    for s in _stream([da, db], kept, opts, opts.k, with_base, "compare"):
        name = s.deltas[0].name
        rows[name] = _compare_row(s, opts, with_base)
        if opts.keep_spectra:
            spectra[name] = (s.spectra[0], s.spectra[1])
    spectra = {na: spectra[na] for na, _ in kept if na in spectra}
    df = _frame([rows[na] for na, _ in kept], cols.compare_columns(with_base), spectra,
                da.skipped + db.skipped)
    df.attrs["only_a"] = sorted(set(da) - {p[0] for p in pairs})
    df.attrs["only_b"] = sorted(set(db) - {p[1] for p in pairs})
    return df


def _compare_row(s: Solved, opts: Options, with_base: bool) -> dict[str, Any]:
    ident = _identity(s.deltas[0])
    row: dict[str, Any] = {c: ident[c] for c in cols.IDENTITY if c not in cols.PER_SIDE_IDENTITY}
    eigs = relative.BaseEigs()  # one eigh of W when both sides have the same base
    for i, side in enumerate(("a", "b")):
        d, sp, w = s.deltas[i], s.spectra[i], s.bases[i]
        part = {"method": d.method, "rank_bound": d.rank_bound}
        part |= M.spectral_metrics(sp.values, sp.shape, opts.top_k)
        if with_base and w is not None:
            part |= _base_metrics(sp, M.fro_norm(sp.values), s.ops[i], w, opts, eigs)
        row |= {f"{c}_{side}": v for c, v in part.items()}
    return row | _pairwise(s, opts.k)


def spectra(path: str | Path, base: str | Path | None = None, k: int | None = None,
            vectors: bool = False, **options: Any) -> dict[str, Spectrum]:
    """Module name → :class:`Spectrum` of the update at ``path`` (values, and top-k vectors)."""
    opts = make_options(options)
    deltas = load(path, base, allow_modified_base=opts.allow_modified_base)
    vk = (k if k is not None else -1) if vectors else 0
    names = _selected(deltas, opts)
    out = {}
    for s in _stream([deltas], [(n,) for n in names], opts, vk, False, "spectra"):
        sp = s.spectra[0]
        out[s.deltas[0].name] = sp if k is None else Spectrum(sp.values[:k], sp.shape, sp.route,
                                                              sp.U, sp.V)
    return {n: out[n] for n in names}
