"""Baseline files for ``deltaspec check``: what a snapshot stores, and how it is written and read.

A baseline is one JSON object (format ``deltaspec-baseline``, version 1)::

    {"format": "deltaspec-baseline", "version": 1, "created": "2025-01-01T00:00:00Z",
     "deltaspec_version": "0.1.0", "source": "runs/adapter", "base": null,
     "k": 8, "top_k": null, "include": null, "intruders": false,
     "vectors": {"encoding": "float16-base64-le", "layout": "row-major (rows, k)",
                 "sketch": null},
     "modules": {"model.layers.0.self_attn.q_proj": {
         "kind": "q_proj", "layer": 0, "method": "lora", "shape": [4096, 4096], "rank_bound": 16,
         "metrics": {"normalized_entropy": 0.31, ...},
         "vectors": {"k": 8,
                     "left": {"rows": 4096, "sketched": false, "data": "<base64>"},
                     "right": {"rows": 4096, "sketched": false, "data": "<base64>"}}}}}

``metrics`` holds every metric ``analyze`` computed (null where undefined). ``vectors`` holds the
top-K singular vectors of each side (K = min(k, numerical rank)) as float16, little-endian,
row-major (rows, K), base64-encoded; ``null`` for a zero update. With a sketch
(``"sketch": {"dim": D, "hash": "splitmix64-osnap8", "seed": 0}``) a side with more than D rows
is stored as the orthonormal basis of S·U (D × K), S a fixed sparse ±1 matrix that ``check``
regenerates from the hash (:func:`sketch_matrix`): φ is then approximate (measured within ±0.05
at D = 256; unrelated subspaces read K/D instead of K/m) but a 7B-shaped baseline shrinks from
53 MB to 2.6 MB. Only what ``check`` needs is stored, never whole matrices.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as _dt
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from deltaspec import metrics as M
from deltaspec import patterns
from deltaspec.atomic import write_atomic
from deltaspec.config_files import parse_json_file
from deltaspec.errors import ConfigError, UsageError
from deltaspec.options import Options, make_options

if TYPE_CHECKING:
    from deltaspec.result import Analysis

FORMAT = "deltaspec-baseline"
VERSION = 1
ENCODING = "float16-base64-le"
SKETCH_HASH = "splitmix64-osnap8"
SKETCH_NNZ = 8  # non-zeros per column of the sparse sketch
BASELINE_MAX_BYTES = 1 << 30  # unsketched vectors of a 70B model fit; sketched ones are 20× smaller
_IDENTITY = ("module", "layer", "kind", "method", "shape", "rank_bound", "route")


@dataclass(frozen=True, eq=False)
class Basis:
    """Orthonormal columns spanning a top-K singular subspace (rows × K, float64).

    ``sketch`` is 0 for the vectors themselves, else the sketch dimension D (rows = D).
    """

    matrix: torch.Tensor
    sketch: int = 0


@dataclass(frozen=True)
class ModuleRecord:
    """What a baseline keeps of one module."""

    name: str
    kind: str
    layer: int | None
    method: str
    shape: tuple[int, int]
    rank_bound: int
    metrics: dict[str, float | None]
    left: Basis | None = None
    right: Basis | None = None


@dataclass(frozen=True)
class Baseline:
    """A snapshot of one update's per-module metrics and top-K subspaces."""

    source: str
    modules: dict[str, ModuleRecord]
    k: int = 8
    top_k: int | None = None
    base: str | None = None
    include: str | None = None
    intruders: bool = False
    sketch: int = 0
    created: str = ""
    deltaspec_version: str = ""
    path: str = field(default="", compare=False)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@functools.lru_cache(maxsize=8)
def sketch_matrix(dim: int, rows: int, seed: int = 0) -> Any:
    """The fixed sparse (dim × rows) sketch S: column j has one ±1/√8 entry in each of 8 blocks
    of dim/8 rows (an OSNAP sparse embedding); row and sign come from splitmix64(seed, j, t).

    Integer arithmetic only, so every deltaspec version regenerates the same matrix; S·U costs
    O(8·rows·K), about 1 ms for an 11008 × 8 side.
    """
    from scipy import sparse

    if dim % SKETCH_NNZ:
        raise UsageError(f"sketch dimension {dim} must be a multiple of {SKETCH_NNZ}")
    block = np.uint64(dim // SKETCH_NNZ)
    j = np.repeat(np.arange(rows, dtype=np.uint64), SKETCH_NNZ)
    t = np.tile(np.arange(SKETCH_NNZ, dtype=np.uint64), rows)
    v = _splitmix64(np.uint64(seed) * np.uint64(1 << 48) + j * np.uint64(SKETCH_NNZ) + t)
    r = (t * block + (v & np.uint64(0xFFFFFFFF)) % block).astype(np.int64)
    signs = np.where((v >> np.uint64(63)) == 1, 1.0, -1.0) / math.sqrt(SKETCH_NNZ)
    return sparse.csr_matrix((signs, (r, j.astype(np.int64))), shape=(dim, rows))


# The small products below run in numpy: for (m × K)ᵀ(m × K) float64 products torch's CPU path
# was measured 10–100× slower here, and they are the only work check adds to the analysis.
def make_basis(vectors: torch.Tensor, sketch: int = 0) -> Basis:
    """The stored form of top-K vectors (rows × K): themselves, or orth(S·U) when sketched."""
    u = vectors.detach().to("cpu", torch.float64).numpy()
    if not sketch or sketch >= u.shape[0]:
        return Basis(torch.from_numpy(np.ascontiguousarray(u)), 0)
    q, _ = np.linalg.qr(np.asarray(sketch_matrix(sketch, u.shape[0]) @ u))
    return Basis(torch.from_numpy(q), sketch)


def like(reference: Basis, vectors: torch.Tensor) -> Basis:
    """``vectors`` (rows × K, exact) in the same form as ``reference`` (sketched or not)."""
    return make_basis(vectors, reference.sketch)


def similarity(a: Basis, b: Basis, k: int | None = None) -> float:
    """φ(k, k) = ‖Aᵀ B‖²_F / k over the first k columns (k defaults to the smaller count) of two
    bases of the same form: :func:`deltaspec.metrics.subspace_similarity` of their matrices."""
    return M.subspace_similarity(a.matrix, b.matrix, k)


def _encode(b: Basis) -> dict[str, Any]:
    raw = b.matrix.to(torch.float16).numpy().astype("<f2").tobytes()
    return {"rows": int(b.matrix.shape[0]), "sketched": bool(b.sketch),
            "data": base64.b64encode(raw).decode("ascii")}


def _decode(obj: Any, k: int, sketch: int, where: str) -> Basis:
    try:
        rows, sketched = int(obj["rows"]), bool(obj.get("sketched", False))
        raw = base64.b64decode(obj["data"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ConfigError(f"{where}: unreadable vectors ({exc})") from None
    if len(raw) != rows * k * 2:
        raise ConfigError(f"{where}: vectors hold {len(raw)} bytes, expected {rows}×{k} float16")
    if sketched and rows != sketch:
        raise ConfigError(f"{where}: a sketched side has {rows} rows, the sketch dimension is {sketch}")
    arr = np.frombuffer(raw, dtype="<f2").astype(np.float64).reshape(rows, k)
    return Basis(torch.from_numpy(arr.copy()), sketch if sketched else 0)


def _plain(v: Any) -> Any:
    if v is None or v is pd.NA:
        return None
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and math.isnan(v) else v


def records_from(result: Analysis, k: int, sketch: int = 0) -> dict[str, ModuleRecord]:
    """Module records from a core :class:`~deltaspec.result.Analysis` run with ``vectors`` and
    ``keep_spectra``."""
    df = result.frame()
    metric_cols = [c for c in df.columns if c not in _IDENTITY]
    out = {}
    for row in df.to_dict(orient="records"):
        sp = result.spectra[row["module"]]
        kk = min(k, M.numerical_rank(sp.values, sp.shape))
        left = right = None
        if kk and sp.U is not None and sp.V is not None:
            left, right = make_basis(sp.U[:, :kk], sketch), make_basis(sp.V[:, :kk], sketch)
        out[row["module"]] = ModuleRecord(
            name=row["module"], kind=str(row["kind"]), layer=_plain(row["layer"]),
            method=str(row["method"]), shape=tuple(sp.shape), rank_bound=int(row["rank_bound"]),
            metrics={c: _plain(row[c]) for c in metric_cols}, left=left, right=right)
    return out


def run_analysis(path: str | Path, base: str | Path | None, opts: Options) -> Analysis:
    """The one pass snapshot and check both make: the update planned once and executed with
    values and top-K vectors kept."""
    from deltaspec.execute import analyse

    return analyse((path,), base, dataclasses.replace(opts, vectors=True, keep_spectra=True))


def take_snapshot(path: str | Path, base: str | Path | None = None, *, sketch: int = 0,
                  options: Options | None = None, **kwargs: Any) -> Baseline:
    """Analyse the update at ``path`` once and keep what ``check`` needs (see the module doc).

    Args:
        sketch: 0 stores the vectors (float16); D > 0 stores a D-row sketch of each side.
        options: the analysis options (:class:`~deltaspec.options.Options`; ``k`` is how many top
            singular vectors per side are kept), or give them as keyword arguments.
    """
    opts = options if options is not None else make_options(kwargs, public=True)
    if options is not None and kwargs:
        opts = dataclasses.replace(opts, **kwargs)
    k = opts.k
    if sketch and (sketch < 2 * k or sketch % SKETCH_NNZ):
        raise UsageError(f"sketch dimension {sketch} does not fit k = {k}: use a multiple of "
                         f"{SKETCH_NNZ}, at least {2 * k} (e.g. 256)")
    result = run_analysis(path, base, opts)
    from deltaspec import __version__

    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    from deltaspec.loaders.sources.live import describe

    return Baseline(source=describe(path), modules=records_from(result, k, sketch), k=k,
                    top_k=opts.top_k, base=None if base is None else describe(base),
                    include=opts.include, intruders=opts.intruders and result.with_base,
                    sketch=sketch, created=now.replace("+00:00", "Z"),
                    deltaspec_version=__version__)


def to_json(b: Baseline) -> dict[str, Any]:
    """The baseline as the JSON object described in the module doc."""
    sketch = {"dim": b.sketch, "hash": SKETCH_HASH, "seed": 0} if b.sketch else None
    modules = {}
    for name, r in b.modules.items():
        vec = None
        if r.left is not None and r.right is not None:
            vec = {"k": int(r.left.matrix.shape[1]), "left": _encode(r.left),
                   "right": _encode(r.right)}
        modules[name] = {"kind": r.kind, "layer": r.layer, "method": r.method,
                         "shape": list(r.shape), "rank_bound": r.rank_bound,
                         "metrics": r.metrics, "vectors": vec}
    return {"format": FORMAT, "version": VERSION, "created": b.created,
            "deltaspec_version": b.deltaspec_version, "source": b.source, "base": b.base,
            "k": b.k, "top_k": b.top_k, "include": b.include, "intruders": b.intruders,
            "vectors": {"encoding": ENCODING, "layout": "row-major (rows, k)", "sketch": sketch},
            "modules": modules}


def write_baseline(b: Baseline, out: str | Path) -> None:
    """Write ``b`` to ``out`` atomically (a temporary file, then a rename)."""
    write_atomic(out, json.dumps(to_json(b), indent=1, allow_nan=False) + "\n")


def read_baseline(path: str | Path) -> Baseline:
    """Read a baseline file, refusing other formats and versions with a one-line error."""
    p = Path(path)
    data = parse_json_file(p, "a JSON baseline", " (create it with `deltaspec snapshot`)",
                           max_bytes=BASELINE_MAX_BYTES)
    if data.get("format") != FORMAT:
        got = data.get("format")
        raise ConfigError(f"{p}: not a deltaspec baseline (format {got!r}, expected {FORMAT!r}); "
                          "create one with `deltaspec snapshot`")
    version = data.get("version")
    if version != VERSION or isinstance(version, bool):
        raise ConfigError(f"{p}: format version {version} is not supported by this deltaspec "
                          f"(expects {VERSION}); re-create it with `deltaspec snapshot`")
    return from_json(data, str(p))


def from_json(data: dict[str, Any], where: str) -> Baseline:
    """Parse a version-1 baseline object (``where`` names it in errors)."""
    try:
        vec = data["vectors"]
        if vec["encoding"] != ENCODING:
            raise ConfigError(f"{where}: unknown vector encoding {vec['encoding']!r}")
        sketch = int(vec["sketch"]["dim"]) if vec.get("sketch") else 0
        if sketch and vec["sketch"].get("hash") != SKETCH_HASH:
            raise ConfigError(f"{where}: unknown sketch {vec['sketch'].get('hash')!r}")
        if sketch < 0 or sketch % SKETCH_NNZ:
            raise ConfigError(f"{where}: sketch dimension {sketch} is not a multiple of {SKETCH_NNZ}")
        modules = {name: _record(name, m, sketch, where) for name, m in data["modules"].items()}
        k, top_k, include = _positive(data["k"]), data["top_k"], data.get("include")
        if k is None or (top_k is not None and _positive(top_k) is None):
            raise ConfigError(f"{where}: k and top_k must be positive integers")
        if include is not None:
            patterns.check(str(include), f"{where}: include")
        return Baseline(source=str(data["source"]), modules=modules, k=k,
                        top_k=None if top_k is None else int(top_k), base=data.get("base"),
                        include=include, intruders=bool(data.get("intruders", True)),
                        sketch=sketch, created=str(data.get("created", "")),
                        deltaspec_version=str(data.get("deltaspec_version", "")), path=where)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: malformed baseline ({type(exc).__name__}: {exc})") from None


def _metric(v: Any, where: str) -> float | None:
    """A stored metric: a finite number, or null (NaN is stored as null); never a string."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{where} must be a finite number or null, not {v!r:.40}")
    return float(v)


def _positive(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else None


def _record(name: str, m: dict[str, Any], sketch: int, where: str) -> ModuleRecord:
    dims = [_positive(x) for x in m["shape"]]
    if len(dims) != 2 or dims[0] is None or dims[1] is None:
        raise ConfigError(f"{where}: module {name!r}: shape must be two positive integers")
    shape = (dims[0], dims[1])
    metrics = {str(key): _metric(v, f"{where}: module {name!r}: metric {key!r}")
               for key, v in m["metrics"].items()}
    left = right = None
    vec = m.get("vectors")
    if vec:
        kk = _positive(vec["k"])
        if kk is None or kk > min(shape):
            raise ConfigError(f"{where}: module {name!r}: vectors k must be an integer in "
                              f"[1, {min(shape)}], not {vec['k']!r:.40}")
        left = _decode(vec["left"], kk, sketch, f"{where}: module {name!r} (left)")
        right = _decode(vec["right"], kk, sketch, f"{where}: module {name!r} (right)")
        for side, basis, rows in (("left", left, shape[0]), ("right", right, shape[1])):
            want = sketch if basis.sketch else rows
            if basis.matrix.shape[0] != want or (basis.sketch and sketch >= rows):
                raise ConfigError(f"{where}: module {name!r} ({side}): {basis.matrix.shape[0]} "
                                  f"vector rows do not fit shape {shape} (sketch dimension "
                                  f"{sketch})")
    layer = m.get("layer")
    return ModuleRecord(name=name, kind=str(m["kind"]), layer=None if layer is None else int(layer),
                        method=str(m["method"]), shape=(shape[0], shape[1]),
                        rank_bound=int(m["rank_bound"]), metrics=metrics, left=left, right=right)
