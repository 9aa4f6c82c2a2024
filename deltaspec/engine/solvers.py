"""Which symmetric eigensolver a dense CPU solve uses, chosen by measured speed.

Every candidate keeps the accuracy promise (σ within 1e-6·σ₁ of float64 LAPACK); only their
speed differs between machines and libraries, so the choice is measured, never a trade of
accuracy:

- values (all eigenvalues of the float64 Gram):
  ``evd``: ``torch.linalg.eigvalsh`` (LAPACK syevd; MKL in torch's x86 wheels);
  ``tridiag``: scipy's ``dsytrd`` + ``dsterf`` (scipy's own LAPACK, OpenBLAS in its wheels; on
  one thread unless all of torch's measured faster: OpenBLAS's spinning pool collapses on a
  crowded CPU);
  ``svd``: a float64 bidiagonal SVD of the matrix itself (``torch.linalg.svdvals``), no Gram;
  ``f32``: float32 ``gesdd`` (MKL's on x86) with a float64 a-posteriori certificate, the exact
  route where the certificate fails (:mod:`deltaspec.engine.lowprec`).
- values + top-k vectors:
  ``tridiag``: one ``dsytrd``, all values by ``dsterf``, k vectors by inverse iteration and a
  back-transform of k vectors only (:mod:`deltaspec.engine.tridiag`);
  ``eigh``: one ``torch.linalg.eigh`` (one reduction, every vector);
  ``evd``: values by ``evd``, then subspace iteration when the exact eigenvalues say it converges
  fast, else one more reduction (``fallback``: ``tridiag`` or ``eigh``, whichever measured faster).

The documented rule (:func:`rule`, from the libraries' build: :func:`deltaspec.machine.blas_libraries`):
where torch links MKL (its x86 wheels, on Intel and AMD alike; MKL picks its AVX-512 or AVX2
kernels itself) values by MKL's ``syevd`` and values + k vectors by one tridiagonal reduction;
where torch's LAPACK is OpenBLAS (aarch64 wheels), values by scipy's one-thread reduction too.
The ``f32`` route is never the rule: at 4096² its rigorous certificate fails on both vendors.

A measured choice (:func:`calibrate`, a 1024² Gram with a flat spectrum, best of 3 interleaved
rounds, ≈ 3 s on 2 idle cores, the first time a dense module of ≥ ``CALIBRATE_MIN`` columns is
solved on the CPU) replaces the rule's only where a candidate wins by ``WIN``; a calibration
taken on a loaded machine, or with contradictory numbers, is rejected and the rule used
(:mod:`deltaspec.engine.calibration`); a run whose solves disagree with the cached figures by
more than ``DRIFT``× marks them stale. The choice is cached as JSON in the user cache dir
(``$DELTASPEC_CACHE_DIR``, else ``$XDG_CACHE_HOME/deltaspec``, else ``~/.cache/deltaspec``), keyed
by CPU model, thread count and library versions; ``deltaspec calibrate`` shows it (``--redo``
measures again). ``DELTASPEC_SOLVER`` overrides it: ``rule`` (no measuring) or e.g.
``values=evd,vectors=tridiag``. Smaller matrices always use the rule.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltaspec.engine import calibration
from deltaspec.engine.calibration import DRIFT, RETRY_S, WIN
from deltaspec.errors import UsageError

CALIBRATE_MIN = 512  # Gram side below which the route does not matter (and nothing is measured)
CALIBRATE_N = 1024
CALIBRATE_BUDGET_S = 10.0  # no further rounds once this much was spent
VALUES = ("evd", "tridiag", "svd", "f32")
VECTORS = ("tridiag", "evd", "eigh")
FALLBACKS = ("tridiag", "eigh")
# Weight of the flat-spectrum case (where subspace iteration needs a second reduction) when the
# 'evd' vector route is priced against the one-reduction 'tridiag' route.
FLAT_SHARE = 0.5


@dataclass(frozen=True)
class Policy:
    """The CPU solver routes: for all values, for values + top-k vectors, and the second reduction
    of the ``evd`` vector route. ``note`` says why (a rejected calibration's reason);
    ``values_n3`` is the measured seconds of the values route's solve per n³ (0: unknown)."""

    values: str = "evd"
    vectors: str = "tridiag"
    fallback: str = "tridiag"
    source: str = "rule"
    blas_threads: int = 1  # scipy's OpenBLAS threads for ``tridiag`` (0: as many as torch's)
    note: str = field(default="", compare=False)
    values_n3: float = field(default=0.0, compare=False)


RULE = Policy()  # torch with MKL: MKL's syevd for values; one tridiagonal reduction for vectors
OPENBLAS_RULE = Policy("tridiag", "tridiag", "tridiag")  # torch's LAPACK is not MKL
# CUDA: syevd for values; one eigh (one reduction) for values + vectors. DELTASPEC_SOLVER's
# vectors=evd (values, then subspace iteration) applies there too; scipy's routes do not.
GPU_RULE = Policy("evd", "eigh", "eigh", source="gpu-rule")


def rule() -> Policy:
    """The documented choice for this build (see the module's docstring)."""
    from deltaspec.machine import torch_lapack

    return RULE if torch_lapack() == "mkl" else OPENBLAS_RULE


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
_STALE: set[str] = set()  # keys a run found off their cached figures: measured at the next run


def policy(size: int, device_type: str = "cpu") -> Policy:
    """The policy for a solve of a ``size``² Gram matrix (see the module's docstring)."""
    env = os.environ.get("DELTASPEC_SOLVER", "").strip()
    if device_type != "cpu":
        vec = parse(env).vectors if env not in ("", "auto", "rule") else "eigh"
        return GPU_RULE if vec == "tridiag" else Policy("evd", vec, "eigh", source="gpu-rule")
    if env and env != "auto":
        return rule() if env == "rule" else parse(env)
    if size < CALIBRATE_MIN:
        return rule()
    key = _machine_key()
    if key not in _CURRENT:
        _CURRENT[key] = _cached(key) or _store(key, calibrate())
    return _CURRENT[key]


def start_run() -> None:
    """At the start of a run: forget the policies a previous run found stale, so that this run
    measures again (never in the middle of a run: its routes stay the same throughout)."""
    for key in _STALE:
        _CURRENT.pop(key, None)
    _STALE.clear()


def _entry(key: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(cache_file().read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return entry if isinstance(entry, dict) else None


def _cached(key: str) -> Policy | None:
    entry = _entry(key)
    if entry is None or entry.get("stale"):
        return None
    if isinstance(entry.get("seconds"), dict) and "other_cores" not in entry["seconds"]:
        return None  # measured before load was checked (deltaspec < issue 29): measure again
    try:
        if entry.get("rejected"):
            if time.time() - float(entry.get("measured_at", 0)) > RETRY_S:
                return None
            return _with(rule(), "cache", str(entry["rejected"]))
        return Policy(**{f: entry[f] for f in ("values", "vectors", "fallback")}, source="cache",
                      blas_threads=int(entry.get("blas_threads", 1)),
                      values_n3=float(entry.get("values_n3", 0.0)))
    except (ValueError, TypeError, KeyError):
        return None


def _with(pol: Policy, source: str, note: str = "") -> Policy:
    return Policy(pol.values, pol.vectors, pol.fallback, source, pol.blas_threads, note,
                  pol.values_n3)


def _write(key: str, entry: dict[str, Any] | None) -> None:
    """Replace (None: drop) one machine's entry of the cache file (atomically; a read-only home
    means measuring again next process)."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if entry is None:
            data.pop(key, None)
        else:
            data[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def _store(key: str, measured: tuple[Policy, dict[str, Any]]) -> Policy:
    pol, times = measured
    entry = asdict(pol) | {"seconds": times, "size": times.get("size", CALIBRATE_N),
                           "measured_at": time.time()}
    if pol.source != "measured":
        entry["rejected"] = pol.note
    _write(key, entry)
    return pol


def observe(pol: Policy, n: int, seconds: float) -> None:
    """A run's values solve of an n² Gram took ``seconds``: where that is off the cached figure
    (``values_n3``·n³) by more than ``DRIFT``×, mark the entry stale (measured again at the
    next run: :func:`start_run`)."""
    if pol.source not in ("measured", "cache") or not pol.values_n3 or n < CALIBRATE_MIN:
        return
    if not calibration.drifted(seconds, pol.values_n3 * n**3):
        return
    key = _machine_key()
    if _CURRENT.get(key) is pol and key not in _STALE:
        _STALE.add(key)
        entry = _entry(key)
        if entry is not None:
            _write(key, entry | {"stale": f"a {n}² solve took {seconds:.3g} s, "
                                          f"expected {pol.values_n3 * n**3:.3g} s"})


def recalibrate(n: int = CALIBRATE_N) -> Policy:
    """Measure now on an n² Gram (``deltaspec calibrate --redo``), cache and use the result."""
    key = _machine_key()
    _CURRENT[key] = _store(key, calibrate(n))
    _STALE.discard(key)
    return _CURRENT[key]


def describe() -> dict[str, Any]:
    """This machine's key, the policy a large dense solve uses now (cached, measured or the
    rule; not measured here), and the cache entry behind it: what ``deltaspec calibrate``
    shows."""
    from deltaspec.machine import blas_libraries, cpu_flags, cpu_model

    key = _machine_key()
    env = os.environ.get("DELTASPEC_SOLVER", "").strip()
    pol = _CURRENT.get(key) or (parse(env) if env not in ("", "auto", "rule") else None)
    pol = pol or (rule() if env == "rule" else _cached(key)) or _with(rule(), "rule",
                                                                        "not measured yet")
    flags = sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"})
    return {"machine": key, "cpu": cpu_model(), "flags": flags, "blas": blas_libraries(),
            "cache_file": str(cache_file()), "policy": asdict(pol), "rule": asdict(rule()),
            "entry": _entry(key)}


def _candidates(n: int) -> dict[str, Any]:
    """The timed calls of a calibration, on an n² flat-spectrum problem."""
    from deltaspec.engine import lowprec, tridiag
    from deltaspec.engine.kernels import Operand

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(n, n, dtype=torch.float64, generator=gen)
    g = m.T @ m
    op = Operand((n, n), torch.device("cpu"), "calibration", dense=[(1.0, m)])
    every = torch.get_num_threads()
    last: dict[str, Any] = {}
    runs = {
        "gram": lambda: m.T @ m,
        "evd": lambda: torch.linalg.eigvalsh(g),
        "tridiag": lambda: tridiag.eigvals(g, threads=1),
        "tridiag_all": lambda: tridiag.eigvals(g, threads=every),
        "svd": lambda: torch.linalg.svdvals(m),
        "f32": lambda: last.__setitem__("f32", lowprec.certified(op)),
        "tridiag8": lambda: tridiag.eig_top(g, 8, threads=1),
        "eigh": lambda: torch.linalg.eigh(g),
    }
    if every == 1:
        del runs["tridiag_all"]
    return {"runs": runs, "f32_ok": lambda: "f32" in last and last["f32"].values is not None}


def calibrate(n: int = CALIBRATE_N, repeat: int = 3) -> tuple[Policy, dict[str, Any]]:
    """Time each candidate on an n² flat-spectrum problem (best of ``repeat`` interleaved rounds)
    and choose, or reject the measurement and take :func:`rule` (see the module's docstring).

    Values: the fastest of ``evd``, ``tridiag``, ``svd`` and ``f32`` (the SVDs priced against
    the Gram matrix plus the Gram eigensolver; ``f32`` plus the exact route when its certificate
    fails here). Vectors (top 8): the cheapest of one tridiagonal reduction, one ``eigh``, or
    ``evd``'s values plus ``FLAT_SHARE`` of its second reduction."""
    cand = _candidates(n)
    m = calibration.measure(cand["runs"], repeat, CALIBRATE_BUDGET_S)
    times: dict[str, Any] = dict(m.wall)
    info = {"cpu": m.cpu, "rounds": m.rounds, "other_cores": round(m.other_cores, 3), "size": n}
    why = calibration.verdict(m)
    if why is not None:
        return _with(rule(), "rule", f"the rule: calibration rejected ({why})"), times | info
    base = rule()
    threads = 0 if times.get("tridiag_all", float("inf")) < times["tridiag"] else 1
    if threads == 0:  # OpenBLAS's pool helps here: price the 8-vector solve alike
        scale = times["tridiag_all"] / max(times["tridiag"], 1e-12)
        times["tridiag"], times["tridiag8"] = times["tridiag_all"], times["tridiag8"] * scale
    exact = times["gram"] + min(times["evd"], times["tridiag"])
    f32 = times["f32"] + (0.0 if cand["f32_ok"]() else exact)
    gram_values = {"evd": times["gram"] + times["evd"], "tridiag": times["gram"] + times["tridiag"],
                   "svd": times["svd"], "f32": f32}
    values = calibration.choose(gram_values, base.values)
    fallback = calibration.choose({"tridiag": times["tridiag8"], "eigh": times["eigh"]},
                                  base.fallback)
    one = {"tridiag": times["tridiag8"], "eigh": times["eigh"],
           "evd": times["evd"] + FLAT_SHARE * min(times["tridiag8"], times["eigh"])}
    vectors = calibration.choose(one, base.vectors)
    solve = {"evd": times["evd"], "tridiag": times["tridiag"], "svd": times["svd"], "f32": f32}
    return Policy(values, vectors, fallback, "measured", threads, f"best of {m.rounds} rounds",
                  solve[values] / n**3), times | info


__all__ = ["CALIBRATE_MIN", "DRIFT", "FALLBACKS", "GPU_RULE", "Policy", "RULE", "VALUES",
           "VECTORS", "WIN", "cache_file", "calibrate", "describe", "observe", "parse", "policy",
           "recalibrate", "rule", "start_run"]
