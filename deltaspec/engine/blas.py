"""The OpenBLAS thread pools of numpy and of scipy, sized for the duration of a call.

numpy's and scipy's wheels each ship their own OpenBLAS (numpy's with 64-bit integers, its symbols
suffixed ``64_``), each with its own thread pool sized at load time to every core. For calls made of
many tiny steps (the QR of a skinny LoRA factor: 4096×16) or memory-bound ones with a barrier per
column (the tridiagonal reduction), threads that wait on each other cost more than they give: on
2 cores the 448 factor QRs of a 224-module adapter take 0.31 s on two threads and 0.15 s on one.
No torch here: the numpy executor (:mod:`deltaspec.engine.host`) uses it too.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

# which → (a substring of the library's file name, the symbol suffix, a file-name part it must lack)
LIBRARIES = {"scipy": ("libscipy_openblas", "", "openblas64"),
             "numpy": ("libscipy_openblas64", "64_", None)}


@cache
def openblas(which: str) -> tuple[Any, str] | None:
    """(the OpenBLAS library ``which`` ("numpy" or "scipy") loaded in this process, its symbol
    suffix), or None where that package uses another BLAS or is not loaded yet."""
    import numpy  # noqa: F401  (loads numpy's library)

    if which == "scipy":
        import scipy.linalg.lapack  # noqa: F401  (loads scipy's)
    name, suffix, lacks = LIBRARIES[which]
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if name in line}
    except OSError:
        return None
    for path in sorted(paths):
        if lacks is not None and lacks in path:
            continue
        try:
            lib = ctypes.CDLL(path)
            getattr(lib, f"scipy_openblas_set_num_threads{suffix}").argtypes = [ctypes.c_int]
            getattr(lib, f"scipy_openblas_get_num_threads{suffix}").restype = ctypes.c_int
            return lib, suffix
        except (OSError, AttributeError):
            continue
    return None


@contextmanager
def blas_threads(n: int, which: str = "scipy") -> Iterator[None]:
    """OpenBLAS ``which`` on ``n`` threads for the duration (a no-op where it cannot be set)."""
    found = openblas(which)
    if found is None:
        yield
        return
    lib, suffix = found
    get = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
    set_ = getattr(lib, f"scipy_openblas_set_num_threads{suffix}")
    before = get()
    set_(max(1, n))
    try:
        yield
    finally:
        set_(before)


__all__ = ["LIBRARIES", "blas_threads", "openblas"]
