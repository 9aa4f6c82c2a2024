"""Scale-out on ``torch.distributed``: one analysis split over the ranks of a process group.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) deltaspec joins the
job's rendezvous itself — NCCL when every rank has a GPU, gloo otherwise — and tears the group down
at exit; inside a group the user initialised already (the Python API in their own job) it uses that
group as it is. No scheduler of our own: the group is the whole machinery.

How one analysis runs on ``N`` ranks:

1. every rank plans the same jobs from metadata alone (nothing is read yet);
2. :func:`assign` hands the jobs out by estimated cost (longest first to the least loaded rank),
   so a dense 11008×4096 weighs as much as many LoRA modules; each rank streams only its own
   modules' tensors;
3. a rank that fails records one message in the job's store and the others stop at their next
   module (:meth:`World.poll`); a rank that goes silent — no heartbeat for
   ``DELTASPEC_DIST_TIMEOUT`` seconds — is reported rather than waited on;
4. rank 0 gathers every rank's rows (and spectra) and broadcasts them, so every rank goes on with
   the single-process result in the single-process order; under the CLI only rank 0 prints and
   writes (the other ranks' stdout, stderr and file writes go nowhere).

>>> assign([5.0, 1.0, 1.0, 4.0], 2)
[0, 1, 0, 1]
>>> World().distributed, World().is_writer
(False, True)
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from deltaspec.delta import Delta
from deltaspec.errors import DeltaspecError
from deltaspec.world import launched

T = TypeVar("T")
ENV_TIMEOUT = "DELTASPEC_DIST_TIMEOUT"  # seconds a rank may stay silent before the others give up
DEFAULT_TIMEOUT_S = 300.0
HEARTBEAT_S = 1.0  # how often a rank says it is alive (one store increment)
ABORT_KEY = "abort"  # first failure's message (other ranks stop at their next module)


class DistributedError(DeltaspecError):
    """A rank failed, stopped answering, or the group could not be formed."""


class PeerFailed(DeltaspecError):
    """Raised on the ranks that did not fail themselves: the job ends, the message is rank 0's."""


def timeout_s() -> float:
    """``DELTASPEC_DIST_TIMEOUT`` (seconds), or the default."""
    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedError(f"{ENV_TIMEOUT}={raw!r}: not a number of seconds") from None


@dataclass
class World:
    """This process's place in the job: rank, size, local rank, the shared store."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: Any = None  # a c10d Store every rank reaches (None: single process, or none found)
    owned: bool = False  # deltaspec initialised the group (and destroys it at exit)
    _beat: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def distributed(self) -> bool:
        """More than one rank."""
        return self.size > 1

    @property
    def is_writer(self) -> bool:
        """Rank 0 prints and writes every output."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """``auto`` → ``cuda:LOCAL_RANK`` when this rank has a GPU; anything else unchanged."""
        if device == "auto" and self.distributed and torch.cuda.is_available():
            return f"cuda:{self.local_rank % torch.cuda.device_count()}"
        return device

    def poll(self) -> None:
        """Raise :class:`PeerFailed` when another rank has already failed (cheap: one store query)."""
        if self.store is not None and self.store.check([ABORT_KEY]):
            raise PeerFailed(self.store.get(ABORT_KEY).decode("utf-8", "replace"))

    def fail(self, message: str) -> None:
        """Record the first failure for every rank to see (later ones keep the first message)."""
        if self.store is not None:
            self.store.compare_set(ABORT_KEY, "", message)


_STATE: dict[str, Any] = {"world": None}


def _env_int(name: str, default: str | None, lo: int, hi: int | None = None) -> int:
    """A launcher variable as an integer in [lo, hi], or a one-line error naming it."""
    raw = os.environ.get(name, default)
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = None
    if raw is None or value is None or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f"≥ {lo}"
        raise DistributedError(f"environment variable {name}={str(raw)[:40]!r}: expected an "
                               f"integer {bound} (set by torchrun)")
    return value


def current(device: str = "auto") -> World:
    """The world this process runs in, forming the group on first use under a launcher."""
    world = _STATE["world"]
    if world is not None:
        return world
    if dist.is_available() and dist.is_initialized():
        world = _adopt()
    elif launched():
        world = _form(device)
    else:
        return World()
    _STATE["world"] = world
    if world.store is not None:
        _start_heartbeat(world)
    return world


def _adopt() -> World:
    """The user's own group: its rank and size; its store when torch exposes it."""
    try:
        store = dist.PrefixStore("deltaspec/", dist.distributed_c10d._get_default_store())
    except (AttributeError, RuntimeError, ValueError):
        store = None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return World(dist.get_rank(), dist.get_world_size(), local, store, owned=False)


def _form(device: str) -> World:
    """Join the launcher's rendezvous (``env://``) and initialise NCCL or gloo."""
    size = _env_int("WORLD_SIZE", None, 1)
    rank = _env_int("RANK", None, 0, size - 1)
    local = _env_int("LOCAL_RANK", "0", 0)
    wait = timedelta(seconds=timeout_s())
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, size, timeout=wait))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise DistributedError(f"rank {rank}: could not join the job's rendezvous ({exc})") from None
    gpu = device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() > 0
    if gpu:
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group("nccl" if gpu else "gloo", store=dist.PrefixStore("pg/", store),
                            rank=rank, world_size=size, timeout=wait)
    atexit.register(teardown)
    return World(rank, size, local, dist.PrefixStore("deltaspec/", store), owned=True)


def teardown() -> None:
    """Stop the heartbeat and destroy the group deltaspec formed (idempotent)."""
    world = _STATE["world"]
    _STATE["world"] = None
    if world is None:
        return
    world._beat.set()
    if world.owned and dist.is_initialized():
        dist.destroy_process_group()


def _start_heartbeat(world: World) -> None:
    def beat() -> None:
        while not world._beat.wait(HEARTBEAT_S):
            try:
                world.store.add(f"alive/{world.rank}", 1)
            except RuntimeError:  # the store went away: the job is ending
                return

    world.store.add(f"alive/{world.rank}", 1)
    threading.Thread(target=beat, name="deltaspec-heartbeat", daemon=True).start()


def assign(costs: Sequence[float], size: int) -> list[int]:
    """The rank of each job: longest first to the least loaded rank (ties: the lowest rank).

    Deterministic, so every rank computes the same assignment from the same metadata.
    """
    load = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(size), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return owner


def cost(d: Delta, with_base: bool, vectors_k: int) -> float:
    """Estimated flops of one module's solve (shape and route), for :func:`assign`."""
    from deltaspec.engine.spectrum import route

    m, n = d.shape
    if route(d) == "factored":
        r = d.rank_bound
        work = 2.0 * (m + n) * r * r + 10.0 * r ** 3
    else:
        s = min(m, n)
        work = 2.0 * m * n * s + 4.0 * s ** 3  # float64 Gram + symmetric eigensolver
    if with_base and d.base is not None:
        work += 2.0 * m * n * max(vectors_k, 1) + 4.0 * min(m, n) ** 3 / 3
    return work


def _wait_all_done(world: World) -> None:
    """Block until every rank has finished its share; a rank silent too long is an error."""
    world.store.set(f"done/{world.rank}", "1")
    limit = timeout_s()
    last: dict[int, int] = {}
    seen: dict[int, float] = {}
    others = [r for r in range(world.size) if r != world.rank]
    while True:
        pending = [r for r in others if not world.store.check([f"done/{r}"])]
        if not pending:
            return
        now = time.monotonic()
        for r in pending:
            beats = world.store.add(f"alive/{r}", 0)
            if beats != last.get(r):
                last[r], seen[r] = beats, now
            elif now - seen[r] > limit:
                msg = f"rank {r} stopped answering (no heartbeat for {limit:.0f} s)"
                world.fail(msg)
                raise DistributedError(msg)
        time.sleep(0.05)


def run_sharded(world: World, costs: Sequence[float],
                compute: Callable[[list[int]], T]) -> list[tuple[list[int], T]]:
    """Run ``compute`` on this rank's share of the jobs (indices into ``costs``) and gather.

    Returns, on every rank, each rank's (job indices, result): rank 0 gathers them and broadcasts
    the whole, so every rank goes on with the same result (under the CLI only rank 0 prints and
    writes). A failure anywhere is raised on rank 0 with its own message (and as
    :class:`PeerFailed` elsewhere).
    """
    owner = assign(costs, world.size)
    mine = [i for i, r in enumerate(owner) if r == world.rank]
    status: tuple[str, Any]
    try:
        status = ("ok", compute(mine))
    except PeerFailed:
        status = ("peer", None)
    except DeltaspecError as exc:
        world.fail(str(exc))
        status = ("error", exc)
    except Exception as exc:  # a bug on one rank must still end every rank with one line
        msg = f"rank {world.rank}: {type(exc).__name__}: {exc}"
        world.fail(msg)
        status = ("error", DistributedError(msg))
    if world.store is not None:
        _wait_all_done(world)
    gathered: list[Any] | None = [None] * world.size if world.is_writer else None
    dist.gather_object((mine, status), gathered, dst=0)
    box = [_outcome(world, gathered)]
    dist.broadcast_object_list(box, src=0)  # every rank continues with the same result
    if isinstance(box[0], BaseException):
        raise box[0] if world.is_writer else PeerFailed(str(box[0]))
    return box[0]


def _outcome(world: World, gathered: list[Any] | None) -> Any:
    """On rank 0: the first failure (the one the store recorded first), or every rank's result."""
    if gathered is None:
        return None
    errors = [st[1] for _, st in gathered if st[0] == "error"]
    if errors:
        first = world.store.get(ABORT_KEY).decode() if world.store is not None else ""
        return next((e for e in errors if str(e) == first), errors[0])
    if any(st[0] == "peer" for _, st in gathered):
        return DistributedError("a rank stopped early without an error of its own")
    return [(mine, st[1]) for mine, st in gathered]


def run_items(world: World, sides: Sequence[Mapping[str, Delta]], items: list[tuple[str, ...]],
              with_base: bool, vectors_k: int,
              compute: Callable[[list[tuple[str, ...]]], dict[str, T]]) -> dict[str, T]:
    """``compute`` over this rank's share of ``items``; rank 0 gets every rank's results.

    The shares are whole jobs of the single-process plan (:func:`deltaspec.engine.pipeline.plan`:
    a batch of factored modules stays together), so each module is solved exactly as one process
    would solve it. ``compute`` gets its items in the original order and returns name → result.
    """
    from deltaspec.engine.pipeline import plan

    jobs = plan(sides, items, with_base)
    costs = [sum(cost(side[n], with_base, vectors_k) for it in job.items
                 for side, n in zip(sides, it, strict=True)) for job in jobs]
    order = {it: i for i, it in enumerate(items)}

    def work(mine: list[int]) -> dict[str, T]:
        return compute(sorted((it for j in mine for it in jobs[j].items), key=order.__getitem__))

    parts = run_sharded(world, costs, work)
    merged: dict[str, T] = {}
    for _, part in parts:
        merged.update(part)
    return merged
