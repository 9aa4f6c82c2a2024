"""Values and top-k vectors of a symmetric float64 matrix from ONE tridiagonal reduction (CPU).

``dsytrd`` reduces G = Q·T·Qᵀ once (Householder reflectors kept in G's storage); then

- all eigenvalues come from T by ``dsterf`` (root-free QR, O(n²)),
- the k wanted eigenvectors of T by bisection and inverse iteration (``dstebz`` + ``dstein``,
  O(n·k); MRRR ``dstemr`` if inverse iteration does not converge),
- and only those k vectors are taken back through the reflectors (``dormqr``, O(n²·k)),

so values and k vectors cost about what the values alone cost. Where every eigenvector is needed
only through its inner products with a few vectors y (the intruder count), :func:`all_vectors`
gives T's eigenvectors Z and Vᵀy = Zᵀ·(Qᵀy): again no back-transform of n vectors.

These are scipy's LAPACK wrappers (scipy's own LAPACK: OpenBLAS in its wheels), called on the
Gram's memory without a copy. scipy's OpenBLAS keeps its own thread pool; :func:`blas_threads`
(:mod:`deltaspec.engine.blas`) sets its size for the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from deltaspec.engine.blas import blas_threads
from deltaspec.errors import NumericalError

F64 = torch.float64
BLOCK = 64  # dsytrd's panel width (its workspace is n·BLOCK)
DORMQR_T = (BLOCK + 1) * BLOCK  # dormqr's T block (LAPACK ≥ 3.7): less workspace runs unblocked


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


def values(d: np.ndarray, e: np.ndarray, descending: bool = True) -> np.ndarray:
    """All eigenvalues of the tridiagonal (d, e), descending (or ascending) (``dsterf``)."""
    from scipy.linalg import lapack

    w, info = lapack.dsterf(d.copy(), e.copy())
    if info != 0:
        raise NumericalError(f"dsterf did not converge (info={info})")
    return w[::-1].copy() if descending else w


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


def back_transform(c: np.ndarray, tau: np.ndarray, z: np.ndarray,
                   transpose: bool = False) -> np.ndarray:
    """Q·z (``transpose``: Qᵀ·z) for the Q of ``dsytrd`` (lower): Q = H₀…H_{n−2}, Hᵢ's vector 1
    at row i+1 and c[i+2:, i] below. The reflectors are read in place as an (n, n−1) array with
    leading dimension n that starts one element into c, which is how ``dormqr`` wants them."""
    from scipy.linalg import lapack

    n, k = z.shape
    out = np.array(z, dtype=np.float64, order="F")
    if n < 2:
        return out
    flat = c.ravel(order="F")  # a view: c is Fortran-contiguous
    shifted = flat[1: 1 + n * (n - 1)].reshape((n, n - 1), order="F")
    sub, _, info = lapack.dormqr(b"L", b"T" if transpose else b"N", shifted, tau, out[1:],
                                 lwork=max(1, k * BLOCK) + DORMQR_T)
    if info != 0:
        raise NumericalError(f"dormqr failed (info={info})")
    out[1:] = sub
    return out


def all_vectors(d: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every eigenpair of the tridiagonal (d, e), ascending: divide and conquer (``dstevd``).
    With the reflectors of :func:`reduce`, G's eigenvectors are Q·Z — but Vᵀy = Zᵀ(Qᵀy) needs
    only Qᵀ applied to y's few columns, never the O(n³) back-transform of Z that ``eigh`` does."""
    from scipy.linalg import lapack

    w, z, info = lapack.dstevd(d.copy(), e.copy(), compute_v=1)
    if info != 0:
        raise NumericalError(f"dstevd did not converge on a {d.size}×{d.size} tridiagonal "
                             f"(info={info})")
    return w, z


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


@dataclass(eq=False)
class Reduced:
    """A symmetric G kept as one ``dsytrd`` left it, G = Q·T·Qᵀ (reflectors ``c``/``tau``, T's
    diagonal ``d`` and off-diagonal ``e``), for a caller that wants every eigenvector of G but
    only through a few inner products (:meth:`project`), and a few top vectors (:meth:`top`).
    T's eigenvectors are computed on the first :meth:`project` and kept for the next ones (so a
    kept reduction holds 2n² floats: the reflectors and Z), the top vectors on the first
    :meth:`top`. ``threads``: scipy's OpenBLAS threads for the reduction and the top vectors
    (the solver policy's); divide and conquer and the product with Z take every thread
    :func:`deltaspec.engine.kernels.lapack_threads` allows when they run.

    >>> import torch
    >>> g = torch.tensor([[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]], dtype=torch.float64)
    >>> red = Reduced.of(g)
    >>> red.ascending().round(6).tolist()
    [1.0, 3.0, 5.0]
    >>> y = np.eye(3)[:, :1]  # e₁: |cos| with the eigenvectors (e₁ ± e₂)/√2 and e₃
    >>> np.abs(red.project(y)).round(6).ravel().tolist()
    [0.707107, 0.707107, 0.0]
    """

    c: np.ndarray
    d: np.ndarray
    e: np.ndarray
    tau: np.ndarray
    threads: int = 1
    _z: torch.Tensor | None = field(default=None, repr=False)
    _top: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, g: torch.Tensor, threads: int = 1) -> Reduced:
        """Reduce ``g`` (its memory is taken over for the reflectors)."""
        if g.shape[0] < 2:
            raise ValueError("Reduced needs a matrix of order 2 or more")
        with blas_threads(threads):
            c, d, e, tau = reduce(g, overwrite=True)
        return cls(c, d, e, tau, threads)

    def ascending(self) -> np.ndarray:
        """Every eigenvalue of G, ascending (``dsterf``)."""
        return values(self.d, self.e, descending=False)

    def top(self, k: int) -> np.ndarray:
        """G's eigenvectors of the k largest eigenvalues, descending (n, k)."""
        k = min(k, self.d.size)
        if k not in self._top:
            with blas_threads(self.threads):
                z = tridiagonal_top(self.d, self.e, k)[1]
                self._top[k] = np.ascontiguousarray(back_transform(self.c, self.tau, z))
        return self._top[k]

    def project(self, y: np.ndarray) -> np.ndarray:
        """Vᵀ·y for every eigenvector V of G, rows ascending: Zᵀ·(Qᵀ·y)."""
        every = torch.get_num_threads()  # inside lapack_threads(): what the caller may use
        with blas_threads(every):
            if self._z is None:
                self._z = torch.from_numpy(all_vectors(self.d, self.e)[1])
            with blas_threads(self.threads):
                qty = back_transform(self.c, self.tau, y, transpose=True)
        return (self._z.T @ torch.from_numpy(qty)).numpy()
