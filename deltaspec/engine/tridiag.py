"""Values and top-k vectors of a symmetric float64 matrix from ONE tridiagonal reduction (CPU).

``dsytrd`` reduces G = Q·T·Qᵀ once (Householder reflectors kept in G's storage); then

- all eigenvalues come from T by ``dsterf`` (root-free QR, O(n²)),
- the k wanted eigenvectors of T by bisection and inverse iteration (``dstebz`` + ``dstein``,
  O(n·k); MRRR ``dstemr`` if inverse iteration does not converge),
- and only those k vectors are taken back through the reflectors (``dormqr``, O(n²·k)),

so values and k vectors cost about what the values alone cost. These are scipy's LAPACK wrappers
(scipy's own LAPACK: OpenBLAS in its wheels), called on the Gram's memory without a copy. scipy's
OpenBLAS keeps its own thread pool; :func:`blas_threads` sets its size for the call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import torch

from deltaspec.errors import NumericalError

F64 = torch.float64
BLOCK = 64  # dsytrd's panel width (its workspace is n·BLOCK)


@cache
def _openblas() -> Any:
    """scipy's OpenBLAS as loaded in this process (None when scipy uses another LAPACK)."""
    import scipy.linalg.lapack  # noqa: F401  (loads the library)

    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "libscipy_openblas" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if "openblas64" in path:  # numpy's ILP64 copy: not the one scipy.linalg calls
            continue
        try:
            lib = ctypes.CDLL(path)
            lib.scipy_openblas_set_num_threads.argtypes = [ctypes.c_int]
            lib.scipy_openblas_get_num_threads.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    return None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """scipy's OpenBLAS on ``n`` threads for the duration (no-op where it cannot be set)."""
    lib = _openblas()
    if lib is None:
        yield
        return
    before = lib.scipy_openblas_get_num_threads()
    lib.scipy_openblas_set_num_threads(max(1, n))
    try:
        yield
    finally:
        lib.scipy_openblas_set_num_threads(before)


def _as_fortran(g: torch.Tensor, overwrite: bool) -> np.ndarray:
    """G as a Fortran-ordered float64 array: the transposed view of a C-contiguous symmetric G is
    G itself (no copy); ``overwrite`` allows LAPACK to write into it."""
    g = g.detach().to("cpu", F64)
    g = g.contiguous() if overwrite else g.clone(memory_format=torch.contiguous_format)
    return g.numpy().T


def reduce(g: torch.Tensor, overwrite: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """``dsytrd`` of the symmetric ``g``: (reflectors c, diagonal d, off-diagonal e, tau).
    With ``overwrite`` g's memory holds the reflectors afterwards."""
    from scipy.linalg import lapack

    a = _as_fortran(g, overwrite)
    n = a.shape[0]
    c, d, e, tau, info = lapack.dsytrd(a, lower=1, lwork=max(1, n * BLOCK), overwrite_a=1)
    if info != 0:
        raise NumericalError(f"dsytrd failed (info={info}) on a {n}×{n} Gram matrix")
    return c, d, e, tau


def values(d: np.ndarray, e: np.ndarray) -> np.ndarray:
    """All eigenvalues of the tridiagonal (d, e), descending (``dsterf``)."""
    from scipy.linalg import lapack

    w, info = lapack.dsterf(d.copy(), e.copy())
    if info != 0:
        raise NumericalError(f"dsterf did not converge (info={info})")
    return w[::-1].copy()


def tridiagonal_top(d: np.ndarray, e: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k eigenpairs of the tridiagonal (d, e), descending: bisection + inverse iteration
    (``dstebz`` + ``dstein``), or MRRR (``dstemr``) when inverse iteration fails."""
    from scipy.linalg import lapack

    n = d.size
    m, w, iblock, isplit, info = lapack.dstebz(d, e, 3, 0.0, 0.0, n - k + 1, n, 0.0, b"B")
    z = None
    if info == 0 and m == k:
        z, info = lapack.dstein(d, e, w[:m], iblock, isplit)
    if z is None or info != 0:
        m, w, z, info = lapack.dstemr(d, np.append(e, 0.0), 3, 0.0, 0.0, n - k + 1, n)
        if info != 0 or m != k:
            raise NumericalError(f"no top-{k} eigenvectors of a {n}×{n} tridiagonal (info={info})")
    order = np.argsort(w[:k])[::-1]
    return w[:k][order], np.asfortranarray(z[:, :k][:, order])


def back_transform(c: np.ndarray, tau: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Q·z for the Q of ``dsytrd`` (lower): Q = H₀…H_{n−2}, Hᵢ's vector 1 at row i+1 and
    c[i+2:, i] below. The reflectors are read in place as an (n, n−1) array with leading
    dimension n that starts one element into c, which is how ``dormqr`` wants them."""
    from scipy.linalg import lapack

    n, k = z.shape
    out = np.array(z, dtype=np.float64, order="F")
    if n < 2:
        return out
    flat = c.ravel(order="F")  # a view: c is Fortran-contiguous
    shifted = flat[1: 1 + n * (n - 1)].reshape((n, n - 1), order="F")
    sub, _, info = lapack.dormqr(b"L", b"N", shifted, tau, out[1:], lwork=max(1, k * BLOCK))
    if info != 0:
        raise NumericalError(f"dormqr failed (info={info})")
    out[1:] = sub
    return out


def eig_top(g: torch.Tensor, k: int, overwrite: bool = False,
            threads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All eigenvalues of the symmetric ``g`` (descending) and its top-k eigenvectors (n, k),
    from one reduction. ``overwrite``: g's memory may be used (it is then destroyed)."""
    if g.shape[0] < 2:  # the wrappers want an off-diagonal of length ≥ 1
        one = g.detach().to("cpu", F64).reshape(-1).clone()
        return one, torch.ones(g.shape[0], min(k, g.shape[0]), dtype=F64)
    with blas_threads(threads):
        c, d, e, tau = reduce(g, overwrite)
        lam = values(d, e)
        if k <= 0:
            return torch.from_numpy(lam), torch.zeros(d.size, 0, dtype=F64)
        _, z = tridiagonal_top(d, e, k)
        v = back_transform(c, tau, z)
    return torch.from_numpy(lam), torch.from_numpy(np.ascontiguousarray(v))


def eigvals(g: torch.Tensor, overwrite: bool = False, threads: int = 1) -> torch.Tensor:
    """All eigenvalues of the symmetric ``g``, descending (``dsytrd`` + ``dsterf``)."""
    return eig_top(g, 0, overwrite, threads)[0]
