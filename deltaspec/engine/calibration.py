"""Timing the CPU solver candidates so that a busy machine cannot poison the choice.

A calibration is a few interleaved rounds (every candidate once per round, so a change of load
hits all of them alike); each candidate keeps its best wall time and its best *own* CPU time
(the process's CPU time less that of this process's other Python threads: the LAPACK and
OpenMP/OpenBLAS workers count, a prefetch worker or any busy thread does not). Around the
rounds, the CPU time of the whole machine (``/proc/stat``) is read too: what the machine spent
beyond this process's own work is *other work*, in cores on average over the calibration.

A calibration is not trusted (:func:`verdict`) when

- other work averaged more than ``LOAD_CORES`` cores: the wall times measured a share of a CPU,
  and the share differs between single- and multi-threaded candidates (the issue's poisoned
  cache: ``eigh`` 18.8 s against ``evd`` 1.47 s for a 1024² Gram, 0.09 s and 0.06 s idle);
- or its numbers contradict what the libraries are known to do (:data:`KNOWN_SLOWER`: a
  candidate that does strictly more work on the same library measured faster than the one it
  contains by more than ``INCONSISTENT``×).

Then the documented rule is used instead, and the rejection is cached for ``RETRY_S`` seconds
only. After a trusted calibration, :func:`drifted` compares what a run observes with the cached
figures: off by more than ``DRIFT``× (after scaling by n³) marks the entry stale, and the next
run re-measures. Everything here is pure timing; what is timed and chosen lives in
:mod:`deltaspec.engine.solvers`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

LOAD_CORES = 0.5  # other work (cores, on average) above which a calibration is not trusted
INCONSISTENT = 1.5  # a known-slower candidate faster than its partner by this factor: rejected
WIN = 1.15  # a measured candidate replaces the rule's only when this much faster
DRIFT = 4.0  # observed / cached throughput (n³-scaled) beyond which the cache is stale
RETRY_S = 6 * 3600.0  # a rejected calibration is retried after this long
# (slower, faster, why): the first does strictly more work than the second on the same library
KNOWN_SLOWER = (
    ("eigh", "evd", "syevd with every eigenvector does more than its values alone"),
    ("tridiag8", "tridiag", "one reduction + 8 vectors does the values' reduction and more"),
)


def other_threads_cpu() -> float:
    """CPU seconds used so far by this process's Python threads other than the calling one."""
    me = threading.get_ident()
    total = 0.0
    for t in threading.enumerate():
        if t.ident is None or t.ident == me:
            continue
        try:
            total += time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, AttributeError, OverflowError):  # ended meanwhile, or not on this OS
            continue
    return total


def own_cpu() -> float:
    """This process's CPU seconds less its other Python threads' (see the module's docstring)."""
    return time.process_time() - other_threads_cpu()


def machine_cpu(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds the whole machine has been busy (every core; steal counts as busy), or None
    where ``/proc/stat`` cannot be read."""
    import os

    try:
        with open(stat) as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


@dataclass
class Measured:
    """Best wall and own-CPU seconds per candidate, and the machine's other work meanwhile."""

    wall: dict[str, float]
    cpu: dict[str, float]
    rounds: int = 0
    other_cores: float = 0.0  # cores used by other work, on average over the calibration
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def measure(runs: Mapping[str, Callable[[], object]], repeat: int = 3,
            budget_s: float = 10.0) -> Measured:
    """Time every candidate in ``repeat`` interleaved rounds (fewer once ``budget_s`` is spent),
    best of each, and the other work on the machine meanwhile."""
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    m0, c0, t0 = machine_cpu(), own_cpu(), time.perf_counter()
    rounds = 0
    for _ in range(repeat):
        for name, fn in runs.items():
            a, w = own_cpu(), time.perf_counter()
            fn()
            wall[name] = min(wall[name], time.perf_counter() - w)
            cpu[name] = min(cpu[name], own_cpu() - a)
        rounds += 1
        if time.perf_counter() - t0 > budget_s:
            break
    elapsed = time.perf_counter() - t0
    m1 = machine_cpu()
    other = 0.0
    if m0 is not None and m1 is not None and elapsed > 0:  # a busy thread of ours is other work
        other = max(0.0, (m1 - m0) - (own_cpu() - c0)) / elapsed
    return Measured(wall, cpu, rounds, other, elapsed)


def verdict(m: Measured, load_cores: float = LOAD_CORES) -> str | None:
    """Why ``m`` is not to be trusted (one line), or None when it is.

    >>> verdict(Measured({"evd": 0.06, "eigh": 0.09}, {}, 3, other_cores=0.1)) is None
    True
    >>> verdict(Measured({"evd": 1.0, "eigh": 0.2}, {}, 3))
    'inconsistent: eigh 0.2 s < evd 1 s / 1.5 (syevd with every eigenvector does more than its values alone)'
    >>> verdict(Measured({"evd": 1.47, "eigh": 18.8}, {}, 3, other_cores=1.3))
    'loaded: other work used 1.3 cores during the calibration (limit 0.5)'
    """
    if m.other_cores > load_cores:
        return (f"loaded: other work used {m.other_cores:.1f} cores during the calibration "
                f"(limit {load_cores:g})")
    for slow, fast, why in KNOWN_SLOWER:
        ts, tf = m.wall.get(slow), m.wall.get(fast)
        if ts is not None and tf is not None and ts * INCONSISTENT < tf:
            return f"inconsistent: {slow} {ts:.3g} s < {fast} {tf:.3g} s / {INCONSISTENT:g} ({why})"
    return None


def choose(times: Mapping[str, float], rule: str, win: float = WIN) -> str:
    """The rule's candidate unless another is more than ``win``× faster (then the fastest).

    >>> choose({"evd": 1.0, "tridiag": 0.9}, "evd"), choose({"evd": 1.0, "tridiag": 0.5}, "evd")
    ('evd', 'tridiag')
    """
    best = min(times, key=lambda n: times[n])
    return best if times[best] * win < times.get(rule, float("inf")) else rule


def drifted(observed_s: float, expected_s: float, factor: float = DRIFT) -> bool:
    """True when an observed solve disagrees with the cached figure by more than ``factor``×.

    >>> drifted(2.5, 94.0), drifted(2.5, 3.8), drifted(40.0, 3.8)
    (True, False, True)
    """
    if observed_s <= 0 or expected_s <= 0:
        return False
    ratio = observed_s / expected_s
    return ratio > factor or ratio < 1 / factor


__all__ = ["DRIFT", "INCONSISTENT", "KNOWN_SLOWER", "LOAD_CORES", "Measured", "RETRY_S", "WIN",
           "choose", "drifted", "machine_cpu", "measure", "other_threads_cpu", "own_cpu",
           "verdict"]
