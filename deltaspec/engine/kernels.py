"""Numerical kernels of the spectral engine, on whatever device the operands live on.

Everything here works in float64 on blocks of the operands, so a bf16 matrix is never copied to
float64 whole unless the memory guard (:func:`block_budget`) says the device has room for it:

- :class:`Operand`: a matrix given as Σ cᵢ·Dᵢ + Σ Bⱼ·Aⱼ (dense terms in any float dtype, factored
  terms), e.g. ΔW = W_ft − W_base read as stored, or W + ΔW for the intruder count.
- :func:`gram`: the float64 Gram matrix of the smaller side, accumulated block by block.
- :func:`eigvalsh_desc` / :func:`eigh_desc`: symmetric eigenproblems, descending, with a fallback
  to the CPU when the device runs out of memory.
- dense solves (values, top-k vectors) live in :mod:`deltaspec.engine.dense`.
- :func:`factored_batch`: exact σ (and vectors) of N factored updates of one shape in single calls.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from deltaspec.delta import check_finite
from deltaspec.errors import NumericalError

F64 = torch.float64
# One float64 working block on the CPU takes half of this (32 MiB): RSS stays flat in matrix
# size, and glibc serves blocks that large with mmap, so they go back to the system when freed.
CPU_BLOCK_BYTES = 64 << 20
GPU_BLOCK_FRACTION = 0.25  # of the free device memory, for one float64 block


def block_budget(device: torch.device) -> int:
    """Bytes one float64 working block may take on ``device`` (the memory guard)."""
    if device.type != "cuda":
        return CPU_BLOCK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(int((free + cached) * GPU_BLOCK_FRACTION), 8 << 20)


def device_has_room(device: torch.device, nbytes: int) -> bool:
    """True when ``nbytes`` more fit on ``device`` (always True on the CPU)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return nbytes < 0.9 * (free + cached)


@dataclass
class Operand:
    """A matrix Σ cᵢ·Dᵢ + Σ Bⱼ·Aⱼ on one device, read in float64 blocks.

    ``dense`` holds (coefficient, (m, n) tensor of any float dtype); ``factored`` holds (B (m, R),
    A (R, n)). ``label`` names the tensor in error messages.
    """

    shape: tuple[int, int]
    device: torch.device
    label: str = "matrix"
    dense: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    factored: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def plus(self, other: Operand, label: str | None = None) -> Operand:
        """The sum of two operands of the same shape (no arithmetic happens here)."""
        return Operand(self.shape, self.device, label or self.label, self.dense + other.dense,
                       self.factored + other.factored)

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        """Rows lo:hi in float64."""
        return self._block(slice(lo, hi), slice(None))

    def cols(self, lo: int, hi: int) -> torch.Tensor:
        """Columns lo:hi in float64."""
        return self._block(slice(None), slice(lo, hi))

    def _block(self, r: slice, c: slice) -> torch.Tensor:
        out: torch.Tensor | None = None
        for coef, d in self.dense:
            if out is None:
                out = d[r, c].to(F64, copy=True)
                if coef != 1.0:
                    out.mul_(coef)
            else:
                out.add_(d[r, c], alpha=coef)  # up-cast element by element, no temporary
        for b, a in self.factored:
            blk = b[r].to(F64) @ a[:, c].to(F64)
            out = blk if out is None else out.add_(blk)
        if out is None:
            m = len(range(*r.indices(self.shape[0])))
            n = len(range(*c.indices(self.shape[1])))
            return torch.zeros(m, n, dtype=F64, device=self.device)
        return out

    def step(self, along_rows: bool) -> int:
        """How many rows (or columns) one float64 block may hold."""
        other = self.shape[1] if along_rows else self.shape[0]
        return max(1, block_budget(self.device) // (8 * max(other, 1) * 2))

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """M @ x in float64 (x: (n, q))."""
        x = x.to(self.device, F64)
        out = torch.zeros(self.shape[0], x.shape[1], dtype=F64, device=self.device)
        if self.dense:
            s = self.step(True)
            for lo in range(0, self.shape[0], s):
                hi = min(lo + s, self.shape[0])
                out[lo:hi] += _dense_only(self, slice(lo, hi), slice(None)) @ x
        for b, a in self.factored:
            out += b.to(F64) @ (a.to(F64) @ x)
        return out

    def rmm(self, y: torch.Tensor) -> torch.Tensor:
        """Mᵀ @ y in float64 (y: (m, q))."""
        y = y.to(self.device, F64)
        out = torch.zeros(self.shape[1], y.shape[1], dtype=F64, device=self.device)
        if self.dense:
            s = self.step(True)
            for lo in range(0, self.shape[0], s):
                hi = min(lo + s, self.shape[0])
                out += _dense_only(self, slice(lo, hi), slice(None)).T @ y[lo:hi]
        for b, a in self.factored:
            out += a.to(F64).T @ (b.to(F64).T @ y)
        return out

    def fro2(self) -> float:
        """‖M‖²_F in float64 (blockwise)."""
        total = 0.0
        s = self.step(True)
        for lo in range(0, self.shape[0], s):
            total += float(self.rows(lo, min(lo + s, self.shape[0])).square().sum())
        return total

    def check_finite(self) -> None:
        """Raise :class:`NumericalError` naming the tensor if a term holds NaN/Inf."""
        for t in [d for _, d in self.dense] + [t for pair in self.factored for t in pair]:
            check_finite(t, self.label)

    def is_zero(self) -> bool:
        """True when the matrix is exactly zero (a frozen module)."""
        if not self.dense:
            return all(not bool(b.any()) or not bool(a.any()) for b, a in self.factored)
        if not self.factored and len(self.dense) == 1:
            return not bool(self.dense[0][1].any())
        (c1, t1), (c2, t2) = self.dense[0], self.dense[-1]
        if not self.factored and len(self.dense) == 2 and c1 == -c2 and t1.dtype == t2.dtype:
            return torch.equal(t1, t2)  # tuned − base: zero when bitwise equal
        s = self.step(True)
        return all(not bool(self.rows(lo, min(lo + s, self.shape[0])).any())
                   for lo in range(0, self.shape[0], s))


TINY_GRAM = 1e-150  # a Gram diagonal below this has lost its small entries to underflow


def rescaled(op: Operand, g: torch.Tensor) -> tuple[Operand, float]:
    """(op, 1.0), or — when the Gram ``g`` of a tiny matrix underflowed (entries ~1e-200 square
    to 0) — (2ᵉ·op, 2ᵉ) scaled so its largest entry is about 1: its Gram is then exact, and its
    singular values are 2ᵉ·σ (an exact power of two: nothing is rounded)."""
    if float(g.diagonal().max()) >= TINY_GRAM:
        return op, 1.0
    s = op.step(True)
    top = max(float(op.rows(lo, min(lo + s, op.shape[0])).abs().max())
              for lo in range(0, op.shape[0], s))
    if top == 0.0:
        return op, 1.0
    f = 2.0 ** min(1000, -math.frexp(top)[1])
    return Operand(op.shape, op.device, op.label, [(c * f, d) for c, d in op.dense],
                   [(b.to(F64) * f, a) for b, a in op.factored]), f


def _dense_only(op: Operand, r: slice, c: slice) -> torch.Tensor:
    return Operand(op.shape, op.device, op.label, op.dense)._block(r, c)


def gram(op: Operand) -> tuple[torch.Tensor, bool]:
    """The float64 Gram matrix of the smaller side — MᵀM (True) when n ≤ m, else MMᵀ (False) —
    accumulated over blocks of the longer side (on the CPU when the device has no room for it).
    On the CPU only the lower triangle is multiplied out (symmetric, ~40 % fewer flops)."""
    m, n = op.shape
    tall = m >= n
    k = n if tall else m
    home = op.device if device_has_room(op.device, 3 * k * k * 8) else torch.device("cpu")
    g = torch.zeros(k, k, dtype=F64, device=home)
    length = m if tall else n
    s = op.step(tall)
    for lo in range(0, length, s):
        hi = min(lo + s, length)
        blk = (op.rows(lo, hi) if tall else op.cols(lo, hi).T).to(home)  # (block, k)
        if home.type == "cpu" and k >= 2 * GRAM_TILE:
            _lower_gram_update(g, blk)
        else:
            g.addmm_(blk.T, blk)
    if home.type == "cpu" and k >= 2 * GRAM_TILE:
        _mirror_lower(g)
    if not bool(torch.isfinite(g.diagonal()).all()):
        op.check_finite()
        raise NumericalError(f"{op.label}: the Gram matrix overflows float64")
    return g, tall


GRAM_TILE = 1024


def _mirror_lower(g: torch.Tensor) -> None:
    """Fill the tiles above the diagonal from those below, tile by tile (no n² temporaries)."""
    k = g.shape[0]
    for a in range(0, k, GRAM_TILE):
        for b in range(a + GRAM_TILE, k, GRAM_TILE):
            g[a:a + GRAM_TILE, b:b + GRAM_TILE].copy_(g[b:b + GRAM_TILE, a:a + GRAM_TILE].T)


def _lower_gram_update(g: torch.Tensor, blk: torch.Tensor) -> None:
    """g[i, j] += blk[:, i]ᵀ·blk[:, j] for the tiles on and below the diagonal only."""
    k = g.shape[0]
    edges = list(range(0, k, GRAM_TILE)) + [k]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        left = blk[:, a:b].T
        g[a:b, :b].addmm_(left, blk[:, :b])


def _on_cpu_if_needed(g: torch.Tensor, factor: int) -> torch.Tensor:
    """``g`` itself, or a CPU copy when the device has no room for ``factor`` more copies."""
    if g.is_cuda and not device_has_room(g.device, factor * g.numel() * 8):
        return g.cpu()
    return g


_SHARED = threading.local()  # .busy: tells whether a prefetch worker is busy on the other threads


@contextmanager
def sharing_cpu(busy: Callable[[], bool]) -> Iterator[None]:
    """Run this thread's solves beside a prefetch worker; ``busy()`` says whether it is working
    now (see :func:`lapack_threads`)."""
    before = getattr(_SHARED, "busy", None)
    _SHARED.busy = busy
    try:
        yield
    finally:
        _SHARED.busy = before


@contextmanager
def lapack_threads() -> Iterator[None]:
    """Half the intra-op threads (at least one) for barrier-bound CPU LAPACK calls made while the
    pipeline's worker is busy (:func:`sharing_cpu`); all of them otherwise.

    The tridiagonal reduction is memory-bound with a barrier per column, and the QR of a skinny
    factor is a string of tiny steps: threads that have to wait for a core lose much at each
    barrier. On 2 idle cores, a 4096² Gram takes 2.0–2.7 s in ``eigvalsh`` on two threads and
    3.5 s on one (``eigh``: 10 s and 18 s); beside a busy core, two threads take 3.8–8.4 s.
    The worker forms the next module's Gram meanwhile, then waits: the intruder count's base
    decomposition that follows usually finds it idle and takes every thread.
    """
    before = torch.get_num_threads()
    busy = getattr(_SHARED, "busy", None)
    want = max(1, before // 2) if busy is not None and busy() else before
    if want == before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def eigvalsh_desc(g: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the symmetric ``g``, descending (float64, on g's device when it fits)."""
    dev = g.device
    try:
        g = _on_cpu_if_needed(g, 3)
        if g.is_cuda:
            return torch.linalg.eigvalsh(g).flip(0)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        g = g.cpu()
    with lapack_threads():
        return torch.linalg.eigvalsh(g).flip(0).to(dev)


def eigh_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the symmetric ``g``, eigenvalues descending."""
    dev = g.device
    try:
        g = _on_cpu_if_needed(g, 4)
        if g.is_cuda:
            lam, vec = torch.linalg.eigh(g)
            return lam.flip(0), vec.flip(1)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        g = g.cpu()
    with lapack_threads():
        lam, vec = torch.linalg.eigh(g)
    return lam.flip(0).to(dev), vec.flip(1).to(dev)


@dataclass
class FactoredResult:
    """σ of each of N factored updates (N, R) and their top vectors (N, m, k), (N, n, k)."""

    values: torch.Tensor
    nonzero: list[bool]
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None


def factored_batch(b: torch.Tensor, a: torch.Tensor, vectors_k: int) -> FactoredResult:
    """Exact σ of ΔWᵢ = Bᵢ·Aᵢ for a batch B (N, m, R), A (N, R, n): QR of Bᵢ and Aᵢᵀ, SVD of the
    R×R cores, all in float64 and in single batched calls. ΔW is never formed; ‖ΔWᵢ‖ = ‖coreᵢ‖
    tells the zero updates apart."""
    b, a = b.to(F64), a.to(F64)
    with lapack_threads() if b.device.type == "cpu" else nullcontext():
        if not vectors_k:
            rb = torch.linalg.qr(b, mode="r")[1]  # (N, R, R)
            ra = torch.linalg.qr(a.mT, mode="r")[1]
            core = rb @ ra.mT  # ΔW = Q_B · core · Q_Aᵀ
            return FactoredResult(torch.linalg.svdvals(core), _nonzero(core))
        qb, rb = torch.linalg.qr(b)  # (N, m, R), (N, R, R)
        qa, ra = torch.linalg.qr(a.mT)  # (N, n, R), (N, R, R)
        core = rb @ ra.mT
        uc, s, vch = torch.linalg.svd(core)
    kk = s.shape[1] if vectors_k < 0 else min(vectors_k, s.shape[1])
    return FactoredResult(s, _nonzero(core), qb @ uc[:, :, :kk], qa @ vch.mT[:, :, :kk])


def _nonzero(core: torch.Tensor) -> list[bool]:
    return (core.abs().amax(dim=(1, 2)) > 0).tolist()


