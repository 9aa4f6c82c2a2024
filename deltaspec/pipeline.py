"""Streaming helpers: read the next modules on a worker thread while the current one is solved.

Reading a tensor (safetensors memory-map + dtype conversion) releases the GIL, so one worker
overlaps disk and conversion with the solver. At most ``depth`` items are in flight, so memory
stays flat in model size: a few matrices, never the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
U = TypeVar("U")


def prefetch(items: Iterable[T], fn: Callable[[T], U], depth: int = 2) -> Iterator[U]:
    """``map(fn, items)`` computed up to ``depth`` items ahead on one worker thread, in order.

    Exceptions raised by ``fn`` surface when their item is reached.

    >>> list(prefetch([1, 2, 3], lambda x: x * 10))
    [10, 20, 30]
    """
    it = iter(items)
    pending: deque[Future[U]] = deque()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltaspec-prefetch") as pool:
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


def shard(names: list[str], rank: int, world: int) -> list[str]:
    """The share of ``names`` that process ``rank`` of ``world`` analyses (round robin).

    >>> shard(["a", "b", "c", "d", "e"], 1, 2)
    ['b', 'd']
    """
    return names[rank::world]
