"""Keeping the resident memory flat while weight files are streamed through (Linux, best effort).

safetensors maps whole files and hands out tensors that alias the mapping: every page a read
touches stays resident in the process until the file is closed, so RSS would grow with the
model. :class:`Releaser` drops those pages (and trims the heap) as modules are finished.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Sequence
from typing import Any

import torch

from deltaspec.engine.kernels import Operand

RELEASE_BYTES = 128 << 20  # mapped weight pages read between two releases
_MADV_WILLNEED, _MADV_DONTNEED = 3, 4
_PAGE = 4096


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux's ``ru_maxrss`` carries the high-water mark of the process that spawned this one
    across ``exec`` (a child of a 2 GB parent reads ≥ 2 GB), so the VmHWM of this process's own
    memory map is read where /proc has it; ``ru_maxrss`` elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    per_mib = 1 << 20 if sys.platform == "darwin" else 1 << 10  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / per_mib


def trim_heap() -> None:
    """Give the heap's freed blocks back to the system (glibc ``malloc_trim``): the working
    blocks of the last module would otherwise stay resident; and MKL's own buffers
    (:func:`free_mkl_buffers`). No-op elsewhere."""
    free_mkl_buffers()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def release_mapped_weights() -> None:
    """Drop this process's references to the pages of memory-mapped ``.safetensors`` files, and
    trim the heap (:func:`trim_heap`).

    safetensors maps whole files and hands out tensors that alias the mapping; every page a read
    touched would stay resident in this process until the file is closed, so RSS would grow with
    the model. Only mappings without private (modified) pages are released, so no data can be
    lost: the pages stay in the page cache and a later read faults them back in. Linux only.
    """
    libc = _libc()
    if libc is None:
        return
    for lo, hi in _clean_weight_mappings():
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)
    trim_heap()


def _clean_weight_mappings() -> list[tuple[int, int]]:
    """(start, end) of each ``.safetensors`` mapping whose pages are all unmodified file pages."""
    try:
        with open("/proc/self/maps") as fh:  # cheap; smaps (per-mapping counts) is not
            if not any(line.rstrip().endswith(".safetensors") for line in fh):
                return []
        with open("/proc/self/smaps") as fh:
            text = fh.read()
    except OSError:
        return []
    out, current = [], None
    for line in text.splitlines():
        head = line.split(None, 5)
        if head and "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            current = None
            if len(head) == 6 and head[5].endswith(".safetensors"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                current = (lo, hi)
        elif current is not None and line.startswith("Anonymous:"):
            if int(line.split()[1]) == 0:
                out.append(current)
            current = None
    return out


class Releaser:
    """Calls :func:`release_mapped_weights` once ``RELEASE_BYTES`` of weights were read since the
    last call (parsing /proc costs a few ms), and once at the end."""

    def __init__(self) -> None:
        self.pending = 0

    def read(self, ops: Sequence[Operand | None]) -> None:
        """Count the dense tensors of ``ops`` as read; release when enough were."""
        self.pending += sum(t.numel() * t.element_size() for op in ops if op is not None
                            for _, t in op.dense)
        if self.pending >= RELEASE_BYTES:
            self.flush()
        else:
            trim_heap()

    def flush(self) -> None:
        """Release now if anything was read."""
        if self.pending:
            self.pending = 0
            release_mapped_weights()


def read_ahead(t: torch.Tensor) -> None:
    """Ask the kernel to start reading ``t``'s pages now (a memory-mapped tensor is otherwise
    read from disk only when the solver first touches it). Best effort, Linux only."""
    libc = _libc()
    if libc is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr() // _PAGE * _PAGE
    end = t.data_ptr() + t.numel() * t.element_size()
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_WILLNEED)


_MKL: list[Any] = []


def free_mkl_buffers() -> None:
    """Release the workspace MKL's memory manager keeps after its calls (``mkl_serv_free_buffers``
    in torch's statically linked MKL; a no-op without it): LAPACK workspaces of n² doubles
    would otherwise stay resident between modules."""
    if not _MKL:
        import os

        try:
            lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
            _MKL.append(lib.mkl_serv_free_buffers)
        except (OSError, AttributeError):
            _MKL.append(None)
    if _MKL[0] is not None:
        _MKL[0]()


_LIBC: list[Any] = []


def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]
