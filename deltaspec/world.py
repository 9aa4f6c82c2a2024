"""Where this process stands in a launched job, read from the launcher's environment in one place
(torch-free): :func:`launched`, :func:`env_rank` and :func:`this_rank_writes`. The process group
itself (:class:`deltaspec.engine.distributed.World`) starts from these.

>>> launched(), env_rank(), this_rank_writes()
(False, 0, True)
"""

from __future__ import annotations

import os


def launched() -> bool:
    """True under ``torchrun`` (or another launcher setting ``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or "1") > 1
    except ValueError:
        return False


def env_rank() -> int:
    """This process's rank from the launcher's environment (0 when not launched)."""
    try:
        return int(os.environ.get("RANK", "0") or "0")
    except ValueError:
        return 0


def this_rank_writes() -> bool:
    """False on the ranks other than 0 of a ``torchrun`` job: they hold the same result as rank 0,
    which alone writes every output; a ``RANK`` that is no rank (garbage) speaks too, so that its
    one-line error is seen."""
    rank = os.environ.get("RANK", "0").strip()
    return not launched() or not rank.isdigit() or int(rank) == 0


__all__ = ["env_rank", "launched", "this_rank_writes"]
