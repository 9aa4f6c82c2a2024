"""What the reference runs know of the machine (torch-free): the default thread count and the
CPU's name — part of the pretrained base's cache key (:func:`deltaspec.reference.configs.pretrain_hash`)
and of every run's environment record (:mod:`deltaspec.reference.loop`)."""

from __future__ import annotations

import platform


def default_threads() -> int:
    """Intra-op threads by default: 1.

    The reference model is small (128 wide), so a second thread buys little, and two OpenMP
    threads on a shared 2-core machine wait on each other at every barrier: measured here with
    other jobs running (load average 2-4), a pretraining step ran 3-8x slower with 2 threads than
    with 1. One thread also keeps tokens/s comparable between methods. Pass ``threads=2`` to use
    both cores of an otherwise idle machine, or any other count on a bigger one.
    """
    return 1


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else the platform's processor string)."""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):  # noqa: SIM115
            if line.lower().startswith("model name"):
                return " ".join(line.partition(":")[2].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


__all__ = ["cpu_name", "default_threads"]
