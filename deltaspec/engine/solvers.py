"""Which exact symmetric eigensolver a dense CPU solve uses, chosen by measured speed.

Every candidate is exact in float64 (backward-stable reductions: σ to ~1e-12·σ₁ on the Gram route);
only their speed differs between machines and libraries, so the choice is measured, never a trade
of accuracy:

- values (all eigenvalues of the float64 Gram):
  ``evd``: ``torch.linalg.eigvalsh`` (LAPACK syevd; MKL in torch's x86 wheels);
  ``tridiag``: scipy's ``dsytrd`` + ``dsterf`` (scipy's own LAPACK, OpenBLAS in its wheels; on
  one thread unless all of torch's measured faster: OpenBLAS's spinning pool collapses on a
  crowded CPU);
  ``svd``: a float64 bidiagonal SVD of the matrix itself (``torch.linalg.svdvals``), no Gram.
- values + top-k vectors:
  ``tridiag``: one ``dsytrd``, all values by ``dsterf``, k vectors by inverse iteration and a
  back-transform of k vectors only (:mod:`deltaspec.engine.tridiag`);
  ``eigh``: one ``torch.linalg.eigh`` (one reduction, every vector);
  ``evd``: values by ``evd``, then subspace iteration when the exact eigenvalues say it converges
  fast, else one more reduction (``fallback``: ``tridiag`` or ``eigh``, whichever measured faster).

The choice (:class:`Policy`) is made once per machine by :func:`calibrate` on a 1024² Gram with
a flat spectrum (best of 3 interleaved rounds, ≈ 3 s on 2 idle cores; the first time a dense
module of ≥ ``CALIBRATE_MIN`` columns is solved on the CPU; a crowded machine measures slower
but all candidates alike) and cached as JSON in the user cache dir (``$DELTASPEC_CACHE_DIR``, else
``$XDG_CACHE_HOME/deltaspec``, else ``~/.cache/deltaspec``), keyed by CPU model, thread count and
library versions. ``DELTASPEC_SOLVER`` overrides it: ``rule`` (the documented :data:`RULE`, no
measuring) or e.g. ``values=evd,vectors=tridiag``. Smaller matrices always use :data:`RULE`.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from deltaspec.errors import UsageError

CALIBRATE_MIN = 512  # Gram side below which the route does not matter (and nothing is measured)
CALIBRATE_N = 1024
CALIBRATE_BUDGET_S = 10.0  # no further rounds once this much was spent
VALUES = ("evd", "tridiag", "svd")
VECTORS = ("tridiag", "evd", "eigh")
FALLBACKS = ("tridiag", "eigh")
# Weight of the flat-spectrum case (where subspace iteration needs a second reduction) when the
# 'evd' vector route is priced against the one-reduction 'tridiag' route.
FLAT_SHARE = 0.5


@dataclass(frozen=True)
class Policy:
    """The CPU solver routes: for all values, for values + top-k vectors, and the second reduction
    of the ``evd`` vector route."""

    values: str = "evd"
    vectors: str = "tridiag"
    fallback: str = "tridiag"
    source: str = "rule"
    blas_threads: int = 1  # scipy's OpenBLAS threads for ``tridiag`` (0: as many as torch's)


RULE = Policy()  # MKL's syevd for values; one tridiagonal reduction for values + vectors
# CUDA: syevd for values; one eigh (one reduction) for values + vectors. DELTASPEC_SOLVER's
# vectors=evd (values, then subspace iteration) applies there too; scipy's routes do not.
GPU_RULE = Policy("evd", "eigh", "eigh", source="gpu-rule")


def _machine_key() -> str:
    import numpy
    import scipy

    from deltaspec.machine import cpu_model

    return (f"{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
            f"|numpy={numpy.__version__}|scipy={scipy.__version__}")


def cache_file() -> Path:
    """Where measured policies are kept (one JSON object, keyed by machine)."""
    root = os.environ.get("DELTASPEC_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "deltaspec")
    return Path(root) / "solver-routes.json"


def parse(text: str) -> Policy:
    """A policy from ``values=…,vectors=…,fallback=…`` (missing keys from :data:`RULE`).

    >>> parse("values=svd,vectors=evd").values
    'svd'
    """
    fields: dict[str, object] = asdict(RULE) | {"source": "DELTASPEC_SOLVER"}
    allowed = {"values": VALUES, "vectors": VECTORS, "fallback": FALLBACKS}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, val = part.partition("=")
        if key not in allowed or val not in allowed[key]:
            raise UsageError(f"DELTASPEC_SOLVER: {part!r} is not one of "
                             + "; ".join(f"{k}={'|'.join(v)}" for k, v in allowed.items()))
        fields[key] = val
    return Policy(**fields)  # type: ignore[arg-type]


_CURRENT: dict[str, Policy] = {}


def policy(size: int, device_type: str = "cpu") -> Policy:
    """The policy for a solve of a ``size``² Gram matrix (see the module's docstring)."""
    env = os.environ.get("DELTASPEC_SOLVER", "").strip()
    if device_type != "cpu":
        vec = parse(env).vectors if env not in ("", "auto", "rule") else "eigh"
        return GPU_RULE if vec == "tridiag" else Policy("evd", vec, "eigh", source="gpu-rule")
    if env and env != "auto":
        return RULE if env == "rule" else parse(env)
    if size < CALIBRATE_MIN:
        return RULE
    key = _machine_key()
    if key not in _CURRENT:
        _CURRENT[key] = _cached(key) or _store(key, calibrate())
    return _CURRENT[key]


def _cached(key: str) -> Policy | None:
    try:
        entry = json.loads(cache_file().read_text()).get(key)
        return Policy(**{f: entry[f] for f in ("values", "vectors", "fallback")}, source="cache",
                      blas_threads=int(entry.get("blas_threads", 1)))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _store(key: str, measured: tuple[Policy, dict[str, float]]) -> Policy:
    pol, times = measured
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data[key] = asdict(pol) | {"seconds": times, "size": CALIBRATE_N}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measure again next process
    return pol


def _best(times: dict[str, float], names: tuple[str, ...]) -> str:
    return min(names, key=lambda n: times[n])


def calibrate(n: int = CALIBRATE_N, repeat: int = 3) -> tuple[Policy, dict[str, float]]:
    """Time each candidate on an n² flat-spectrum problem (best of ``repeat``) and choose.

    Values: the fastest of ``evd``, ``tridiag`` and ``svd`` (the SVD priced against the Gram
    matrix plus the faster Gram eigensolver). Vectors (top 8): the cheapest of one tridiagonal
    reduction, one ``eigh``, or ``evd``'s values plus ``FLAT_SHARE`` of its second reduction."""
    from deltaspec.engine import tridiag

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(n, n, dtype=torch.float64, generator=gen)
    g = m.T @ m
    every = torch.get_num_threads()
    runs = {
        "gram": lambda: m.T @ m,
        "evd": lambda: torch.linalg.eigvalsh(g),
        "tridiag": lambda: tridiag.eigvals(g, threads=1),
        "tridiag_all": lambda: tridiag.eigvals(g, threads=every),
        "svd": lambda: torch.linalg.svdvals(m),
        "tridiag8": lambda: tridiag.eig_top(g, 8, threads=1),
        "eigh": lambda: torch.linalg.eigh(g),
    }
    if every == 1:
        del runs["tridiag_all"]
    times = dict.fromkeys(runs, float("inf"))
    start = time.perf_counter()
    for _ in range(repeat):  # interleaved rounds: a change of load hits every candidate alike
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - t0)
        if time.perf_counter() - start > CALIBRATE_BUDGET_S:  # a crowded machine: one round will do
            break
    threads = 0 if times.get("tridiag_all", float("inf")) < times["tridiag"] else 1
    if threads == 0:  # OpenBLAS's pool helps here: price the 8-vector solve alike
        scale = times["tridiag_all"] / max(times["tridiag"], 1e-12)
        times["tridiag"], times["tridiag8"] = times["tridiag_all"], times["tridiag8"] * scale
    gram_values = {"evd": times["gram"] + times["evd"], "tridiag": times["gram"] + times["tridiag"],
                   "svd": times["svd"]}
    values = _best(gram_values, VALUES)
    fallback = "tridiag" if times["tridiag8"] <= times["eigh"] else "eigh"
    one = {"tridiag": times["tridiag8"], "eigh": times["eigh"],
           "evd": times["evd"] + FLAT_SHARE * min(times["tridiag8"], times["eigh"])}
    vectors = _best(one, VECTORS)
    return Policy(values, vectors, fallback, "measured", threads), times
