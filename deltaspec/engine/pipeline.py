"""Streaming: modules are read, paired, moved to the device and solved while the next ones load.

One worker thread reads the next job's tensors as stored (bf16 stays bf16), copies them through
reused pinned staging buffers to the device on a side CUDA stream, and hands them over with an
event; the main thread solves the previous job meanwhile. At most ``depth`` jobs are in flight,
so memory stays flat in model size: a few matrices, never the model. Factored updates of one
shape are grouped into one job and solved by single batched calls.

The seam for scale-out: :func:`shard` splits the module list between processes; rows concatenate.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from deltaspec.delta import Delta
from deltaspec.engine import dense, kernels, solvers
from deltaspec.engine.kernels import Operand
from deltaspec.engine.memory import Releaser, read_ahead
from deltaspec.engine.spectrum import (
    Spectrum,
    is_factored_route,
    operand,
    route,
    solve_dense,
    solve_factored,
    solve_kronecker,
)

T = TypeVar("T")
U = TypeVar("U")

MAX_BATCH = 64  # factored modules per batched call
BATCH_BYTES = 256 << 20  # float64 working memory of one batched factored call
PINNED_SLOTS = 6  # staging buffers kept for reuse


def prefetch(items: Iterable[T], fn: Callable[[T], U], depth: int = 2,
             initializer: Callable[[], object] | None = None) -> Iterator[U]:
    """``map(fn, items)`` computed up to ``depth`` items ahead on one worker thread, in order.

    Exceptions raised by ``fn`` surface when their item is reached; ``initializer`` runs first
    on the worker thread.

    >>> list(prefetch([1, 2, 3], lambda x: x * 10))
    [10, 20, 30]
    """
    it = iter(items)
    pending: deque[Future[U]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltaspec-prefetch",
                            initializer=initializer) as pool:
        try:
            for item in it:
                pending.append(pool.submit(fn, item))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


class InFlight:
    """How many jobs were handed to the prefetch worker and are not finished: counted up before
    the worker can see a job, so :meth:`busy` is never late."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def handing(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, each counted as in flight as it is handed on."""
        for item in items:
            with self._lock:
                self._n += 1
            yield item

    def done(self) -> None:
        """One job finished (the worker calls this)."""
        with self._lock:
            self._n -= 1

    def busy(self) -> bool:
        """True while the worker has a job."""
        return self._n > 0


def shard(names: list[str], rank: int, world: int) -> list[str]:
    """The share of ``names`` that process ``rank`` of ``world`` analyses (round robin).

    >>> shard(["a", "b", "c", "d", "e"], 1, 2)
    ['b', 'd']
    """
    return names[rank::world]


@dataclass(frozen=True)
class Job:
    """Modules solved together. Each item holds one module name per side (analyze: one side,
    compare: two); a ``batched`` job holds factored updates of one shape and rank."""

    items: list[tuple[str, ...]]
    batched: bool


def plan(sides: Sequence[Mapping[str, Delta]], items: Sequence[tuple[str, ...]], with_base: bool,
         max_batch: int = MAX_BATCH) -> list[Job]:
    """Group the items into jobs, ordered by their first item.

    Factored updates that need no base weight are grouped by (shape, rank) on every side, at most
    ``max_batch`` (and ``BATCH_BYTES`` of float64 work) per job; every other item is a job alone.
    """
    jobs: list[tuple[int, Job]] = []
    groups: dict[tuple[Any, ...], list[tuple[int, tuple[str, ...]]]] = {}
    for i, names in enumerate(items):
        ds = [side[n] for side, n in zip(sides, names, strict=True)]
        needs_base = with_base and any(d.base is not None for d in ds)
        if needs_base or not all(is_factored_route(d) for d in ds):
            jobs.append((i, Job([names], False)))
            continue
        groups.setdefault(tuple((d.shape, d.rank_bound) for d in ds), []).append((i, names))
    for key, members in groups.items():
        per_module = sum((m + n) * r * 8 * 4 for (m, n), r in key)
        cap = max(1, min(max_batch, BATCH_BYTES // max(per_module, 1)))
        for lo in range(0, len(members), cap):
            chunk = members[lo: lo + cap]
            jobs.append((chunk[0][0], Job([names for _, names in chunk], True)))
    return [job for _, job in sorted(jobs, key=lambda t: t[0])]


class Stager:
    """Moves host tensors to the device through reused pinned buffers on a side CUDA stream
    (non-blocking); on the CPU it passes tensors through unchanged."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[list[Any]] = []  # [pinned uint8 buffer, event of its last copy]

    def move(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device, in its own dtype (the up-cast happens there)."""
        if not self.cuda:
            return t
        return self.stack([t])[0]

    def stack(self, ts: list[torch.Tensor]) -> torch.Tensor:
        """``torch.stack(ts)`` on the device: on CUDA written straight into a pinned buffer and
        copied without blocking (dtype kept); on the CPU stacked in float64 in one pass."""
        shape = (len(ts), *ts[0].shape)
        if not self.cuda:
            out = torch.empty(shape, dtype=torch.float64)
            for i, t in enumerate(ts):
                out[i].copy_(t)
            return out
        dtype = ts[0].dtype
        nbytes = math.prod(shape) * ts[0].element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype, device=self.device)
        slot = self._slot(nbytes)
        host = slot[0][:nbytes].view(dtype).view(shape)
        for i, t in enumerate(ts):
            host[i].copy_(t)
        with torch.cuda.stream(self.stream):
            out = host.to(self.device, non_blocking=True)
            slot[1] = torch.cuda.Event()
            slot[1].record(self.stream)
        return out

    def _slot(self, nbytes: int) -> list[Any]:
        free = [s for s in self.slots if s[1] is None or s[1].query()]
        fits = [s for s in free if s[0].numel() >= nbytes]
        if fits:
            return min(fits, key=lambda s: s[0].numel())
        if len(self.slots) < PINNED_SLOTS:
            slot: list[Any] = [torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True), None]
            self.slots.append(slot)
            return slot
        slot = self.slots.pop(0)  # the oldest: wait for its copy, then reuse or grow it
        if slot[1] is not None:
            slot[1].synchronize()
        if slot[0].numel() < nbytes:
            slot[0] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.slots.append(slot)
        return slot

    def fence(self) -> Any:
        """An event after every copy issued so far (None on the CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev


@dataclass
class Staged:
    """A job's tensors on the device: per item and side the Delta, its ΔW and base operands."""

    job: Job
    deltas: list[list[Delta]]
    ops: list[list[Operand]]
    bases: list[list[Operand | None]]
    device: torch.device = torch.device("cpu")
    stacks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    grams: list[tuple[torch.Tensor, bool] | None] = field(default_factory=list)
    event: Any = None


@dataclass
class Solved:
    """One module (one per side): its Delta, spectrum, ΔW operand and base operand (or None)."""

    deltas: list[Delta]
    spectra: list[Spectrum]
    ops: list[Operand]
    bases: list[Operand | None]


def stage(stager: Stager, sides: Sequence[Mapping[str, Delta]], job: Job, with_base: bool,
          releaser: Releaser | None = None) -> Staged:
    """Read a job's tensors and move them to the device (runs on the prefetch worker).
    ``releaser`` (CUDA: the pages are copied and no longer needed) counts what was read."""
    deltas = [[side[n] for side, n in zip(sides, names, strict=True)] for names in job.items]
    dev = stager.device
    if job.batched:
        st = Staged(job, deltas, [[] for _ in deltas], [[None] * len(sides) for _ in deltas], dev)
        for s in range(len(sides)):
            fs = [row[s].factors(torch.float32) for row in deltas]
            b = stager.stack([f[0] for f in fs])
            a = stager.stack([f[1] for f in fs])
            st.stacks.append((b, a))
            for i, row in enumerate(deltas):
                st.ops[i].append(Operand(row[s].shape, dev, row[s].label, factored=[(b[i], a[i])]))
    else:
        ops, bases = [], []
        for d in deltas[0]:
            op = _operand(d, stager, with_base or len(sides) > 1)
            ops.append(op)
            bases.append(_base_operand(d, op, stager) if with_base else None)
            for _, t in op.dense:
                read_ahead(t)
        st = Staged(job, deltas, [ops], [bases], dev)
        if not stager.cuda:  # CPU: the worker's half of the cores forms the Gram matrix too
            st.grams = [None if _factored_single(op) or route(d) == "kronecker" or op.is_zero()
                        or not dense.wants_gram(op)
                        else kernels.gram(op) for d, op in zip(deltas[0], ops, strict=True)]
    st.event = stager.fence()
    if releaser is not None and not job.batched:
        st.event.synchronize()  # the host copies are done: the mapped pages are free to go
        releaser.read([*st.ops[0], *st.bases[0]])
    return st


def _operand(d: Delta, stager: Stager, needed: bool) -> Operand:
    """ΔW of ``d`` on the device — but a Kronecker delta is solved from its factors, so its dense
    product is formed only where base-relative or pairwise metrics need the matrix (``needed``)."""
    if route(d) == "kronecker" and not needed:
        return Operand(d.shape, stager.device, d.label)
    return operand(d, stager.device, move=stager.move)


def _base_operand(d: Delta, op: Operand, stager: Stager) -> Operand | None:
    if d.base is None:
        return None
    label = f"{d.label} (base weight)"
    if getattr(d, "parts", None) is not None:  # ΔW = tuned − base: the base is already here
        return Operand(d.shape, op.device, label, dense=[(1.0, op.dense[1][1])])
    return Operand(d.shape, op.device, label, dense=[(1.0, stager.move(d.base()))])


def _tensors(st: Staged) -> Iterator[torch.Tensor]:
    for row in st.ops + st.bases:
        for op in row:
            if op is not None:
                yield from (t for _, t in op.dense)
                yield from (t for pair in op.factored for t in pair)


def solve(st: Staged, vectors_k: int) -> Iterator[Solved]:
    """Solve a staged job (main thread): one batched call per side, or one dense solve."""
    if st.event is not None:
        cur = torch.cuda.current_stream(st.device)
        cur.wait_event(st.event)
        for t in _tensors(st):
            if t.is_cuda:
                t.record_stream(cur)
    n_sides = len(st.deltas[0])
    spectra: list[list[Spectrum]] = [[] for _ in st.deltas]
    for s in range(n_sides):
        if st.job.batched:
            b, a = st.stacks[s]
            col = solve_factored(b, a, [row[s].shape for row in st.deltas], vectors_k)
        else:
            col = [_solve_one(st.deltas[0][s], st.ops[0][s], vectors_k,
                              st.grams[s] if st.grams else None)]
        for i, sp in enumerate(col):
            spectra[i].append(sp)
    for i, row in enumerate(st.deltas):
        yield Solved(row, spectra[i], st.ops[i], st.bases[i])


def _factored_single(op: Operand) -> bool:
    return not op.dense and len(op.factored) == 1 and op.factored[0][0].shape[1] < min(op.shape)


def _solve_one(d: Delta, op: Operand, vectors_k: int,
               pre: tuple[torch.Tensor, bool] | None) -> Spectrum:
    if route(d) == "kronecker":
        return solve_kronecker(d, vectors_k, op.device)
    if _factored_single(op):
        b, a = op.factored[0]
        return solve_factored(b[None], a[None], [op.shape], vectors_k)[0]
    return solve_dense(op, vectors_k, pre)


def _choose_solver(sides: Sequence[Mapping[str, Delta]], items: Sequence[tuple[str, ...]],
                   device: torch.device) -> None:
    """Settle the CPU solver policy here, on every thread and before the worker starts: a first
    calibration (:func:`deltaspec.engine.solvers.calibrate`) must not share the cores."""
    sizes = [min(side[n].shape) for names in items for side, n in zip(sides, names, strict=True)
             if not is_factored_route(side[n])]
    if device.type == "cpu" and sizes:
        solvers.start_run()  # a policy the last run found stale is measured again here
        solvers.policy(max(sizes))


def solve_stream(sides: Sequence[Mapping[str, Delta]], items: Sequence[tuple[str, ...]],
                 device: torch.device, vectors_k: int, with_base: bool,
                 depth: int | None = None) -> Iterator[Solved]:
    """Solved modules, one per item (one name per side), in job order (batched factored jobs
    first reach their first item's place). ``vectors_k``: top vectors per side (0: none)."""
    jobs = plan(sides, items, with_base)
    _choose_solver(sides, items, device)
    stager = Stager(device)
    depth = depth if depth is not None else (2 if device.type == "cuda" else 1)
    worker_rel, main_rel = (Releaser(), None) if stager.cuda else (None, Releaser())
    threads = torch.get_num_threads()  # also fixes this thread's own count before the worker's

    def init() -> None:  # CPU: the worker takes half the intra-op threads (see engine)
        if not stager.cuda:
            torch.set_num_threads(max(1, threads - threads // 2))

    in_flight = InFlight()  # CPU: LAPACK calls take half the threads while the worker is busy

    def work(job: Job) -> Staged:
        try:
            return stage(stager, sides, job, with_base, worker_rel)
        finally:
            in_flight.done()

    try:
        for st in prefetch(in_flight.handing(jobs), work, depth, init):
            with nullcontext() if stager.cuda else kernels.sharing_cpu(in_flight.busy):
                yield from solve(st, vectors_k)
            if main_rel is not None and not st.job.batched:  # CPU: the solve read the pages
                main_rel.read([*st.ops[0], *st.bases[0]])
    finally:
        torch.set_num_threads(threads)  # threads started later get the caller's count again
        for rel in (worker_rel, main_rel):
            if rel is not None:
                rel.flush()
