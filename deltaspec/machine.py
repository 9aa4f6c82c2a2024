"""The machine a measurement ran on: the CPU model and flags as ``/proc/cpuinfo`` names them, and
the BLAS/LAPACK each numerical library computes with."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows.

    >>> isinstance(cpu_model(), str) and cpu_model() != ""
    True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read).

    >>> isinstance(cpu_flags(), set)
    True
    """
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def torch_lapack() -> str:
    """The LAPACK torch's CPU build links, as its build configuration names it: ``"mkl"`` in
    the x86 wheels (statically linked, so :mod:`threadpoolctl` cannot see it), ``"openblas"``
    in the aarch64 ones, else what ``LAPACK_INFO`` says or ``"none"``.

    >>> torch_lapack() in ("mkl", "openblas", "none") or isinstance(torch_lapack(), str)
    True
    """
    import torch

    if torch.backends.mkl.is_available():
        return "mkl"
    for part in torch.__config__.show().replace(",", " ").split():
        if part.startswith("LAPACK_INFO="):
            return part.split("=", 1)[1] or "none"
    return "none"


def blas_libraries() -> dict[str, str]:
    """Which BLAS/LAPACK each library computes with here: torch (its build), numpy and scipy
    (:mod:`threadpoolctl`: ``openblas 0.3.31 Haswell``, ``mkl 2024.2``, …; ``unknown`` where
    threadpoolctl is missing or finds none).

    >>> sorted(blas_libraries())
    ['numpy', 'scipy', 'torch']
    """
    out = {"torch": torch_lapack(), "numpy": "unknown", "scipy": "unknown"}
    try:
        import numpy  # noqa: F401
        import scipy.linalg  # noqa: F401
        from threadpoolctl import threadpool_info  # type: ignore[import-untyped]
    except ImportError:
        return out
    for info in threadpool_info():
        if info.get("user_api") != "blas":
            continue
        path = str(info.get("filepath", ""))
        who = "numpy" if "numpy" in path else "scipy" if "scipy" in path else None
        if who is not None:
            text = " ".join(str(info.get(k) or "") for k in ("internal_api", "version",
                                                             "architecture"))
            out[who] = " ".join(text.split())
    return out
