r"""The collection math: N updates of one module at once (``deltaspec zoo``), all pairs from small
products, never a dense ΔW for a factored update. Tensors in, numpy arrays out; no pandas.

For the factored updates ΔWₐ = Bₐ·Aₐ (rank Rₐ, zero-padded to a common R):

1. one batched QR of every Bₐ and Aₐᵀ and an SVD of each R×R core
   (:func:`deltaspec.engine.kernels.factored_batch`) give the exact thin SVD ΔWₐ = Uₐ·Sₐ·Vₐᵀ;
2. two Gram matrices of the stacked vectors, G_U = [U₁|…|U_N]ᵀ[U₁|…|U_N] and G_V likewise
   ((N·R)² entries, a symmetric rank-k update each), hold every pairwise quantity:

   - ⟨ΔWₐ, ΔW_b⟩_F = tr(Sₐ G_U[a,b] S_b G_V[a,b]ᵀ) = Σᵢⱼ sₐᵢ s_bⱼ G_U[a,b]ᵢⱼ G_V[a,b]ᵢⱼ — the
     same number as tr((BₐᵀB_b)(A_bAₐᵀ)), and gauge invariant (B·A = (BG)(G⁻¹A));
   - φ(K, K) = ‖G_U[a,b][:K, :K]‖²_F / K (Hu et al. 2021, §7) and the smallest principal angle,
     arccos σ_max(G_U[a,b][:K_a, :K_b]), left and right;
   - the shared basis: the top-d left directions of the whole collection are the top eigenvectors
     of Σₐ ΔWₐΔWₐᵀ = [U₁S₁|…]·[U₁S₁|…]ᵀ, whose non-zero eigenvalues are those of S·G_U·S (N·R
     square): the energy of all N updates that d shared directions capture is exact from them
     (right side: S·G_V·S).

Dense updates (full fine-tunes, and structures kept whole) join through their own top-K vectors
(:func:`deltaspec.engine.spectrum.compute`), inner products taken blockwise against the others'
thin factors, and the shared basis from the smaller-side sum Σₐ ΔWₐΔWₐᵀ in float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from deltaspec import metrics as M
from deltaspec.engine import kernels
from deltaspec.engine.spectrum import compute

F64 = torch.float64


@dataclass(frozen=True)
class Member:
    """One update of one module: its factors (ΔW = b @ a) or its dense matrix (one of them)."""

    b: torch.Tensor | None = None
    a: torch.Tensor | None = None
    dense: torch.Tensor | None = None


@dataclass(frozen=True)
class ModuleStats:
    """Everything the collection needs of one module. (N, N) arrays are symmetric, float64;
    ``k``: the K of each pair (min(K, both numerical ranks); 0: a zero update, φ NaN);
    ``basis_*``: eigenvalues (descending) of Σₐ ΔWₐΔWₐᵀ (left) and Σₐ ΔWₐᵀΔWₐ (right)."""

    inner: np.ndarray
    phi_left: np.ndarray
    phi_right: np.ndarray
    angle_left: np.ndarray
    angle_right: np.ndarray
    k: np.ndarray
    basis_left: np.ndarray
    basis_right: np.ndarray


@dataclass
class _Side:
    """One side's stacked top-K vectors (N, dim, K) with the columns beyond each rank zeroed."""

    top: torch.Tensor
    full_gram: torch.Tensor | None = None  # (N, N, R, R) blocks of the full-vector Gram


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx in float64 for a tall (dim, c) ``x``: on the CPU one symmetric rank-k update (BLAS
    ``dsyrk``, half a matrix product), on a GPU a matrix product.

    >>> import torch
    >>> x = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    >>> gram(x).tolist() == (x.T @ x).tolist()
    True
    """
    x = x.to(F64)
    if x.is_cuda or x.shape[1] < 2:
        return x.T @ x
    from scipy.linalg.blas import dsyrk

    from deltaspec.engine.blas import blas_threads

    xt = x.contiguous().numpy().T  # (c, dim) in Fortran order: dsyrk forms xt·xtᵀ without a copy
    with blas_threads(torch.get_num_threads()):
        upper = dsyrk(1.0, xt, trans=0, lower=0)
    g = np.triu(upper) + np.triu(upper, 1).T
    return torch.from_numpy(g)


@contextlib.contextmanager
def _one_thread(device: torch.device) -> Iterator[int]:
    """LAPACK on one thread for the duration (CPU), yielding the threads there were. The QRs of
    skinny factors and the tridiagonal reduction are barrier-bound: on the shared 2-core CPU a
    1600² ``eigvalsh`` took 2.3 s on one thread and 13.9 s on two (load 10)."""
    before = torch.get_num_threads()
    if device.type != "cpu" or before == 1:
        yield before
        return
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def eigenvalues(mats: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Eigenvalues (descending, clamped at 0) of symmetric matrices; on the CPU each on one
    thread, as many at once as there were threads (:func:`_one_thread`).

    >>> import torch
    >>> [e.tolist() for e in eigenvalues([torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64))])]
    [[3.0, 1.0]]
    """
    if not mats or mats[0].is_cuda:
        return [kernels.eigvalsh_desc(g).clamp_min(0).cpu().numpy() for g in mats]
    with _one_thread(mats[0].device) as threads, \
            ThreadPoolExecutor(max(1, min(threads, len(mats)))) as pool:
        return list(pool.map(lambda g: torch.linalg.eigvalsh(g).flip(0).clamp_min(0).numpy(), mats))


def _blocks(g: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """An (n·r)² matrix as its (n, n, r, r) blocks."""
    return g.reshape(n, r, n, r).permute(0, 2, 1, 3)


def _thin(members: Sequence[Member], dev: torch.device) -> tuple[torch.Tensor, ...]:
    """(σ (F, R), U (F, m, R), V (F, n, R)) of the factored members, exact, R the largest rank
    (smaller ones zero-padded: exact, their extra σ are 0)."""
    r = max(int(x.b.shape[1]) for x in members)  # type: ignore[union-attr]
    bs = torch.stack([torch.nn.functional.pad(x.b.to(dev, F64), (0, r - x.b.shape[1]))  # type: ignore[union-attr]
                      for x in members])
    as_ = torch.stack([torch.nn.functional.pad(x.a.to(dev, F64), (0, 0, 0, r - x.a.shape[0]))  # type: ignore[union-attr]
                       for x in members])
    res = kernels.factored_batch(bs, as_, -1)
    assert res.U is not None and res.V is not None
    return res.values.to(F64), res.U, res.V


def _ranks(values: Sequence[torch.Tensor], shape: tuple[int, int], k: int) -> list[int]:
    return [min(k, M.numerical_rank(v.to("cpu"), shape)) for v in values]


def _masked(vecs: list[torch.Tensor], ks: list[int], k: int) -> torch.Tensor:
    """(N, dim, k) top-k vectors, the columns beyond each member's rank zero."""
    out = torch.zeros(len(vecs), vecs[0].shape[0], k, dtype=F64, device=vecs[0].device)
    for i, (v, ki) in enumerate(zip(vecs, ks, strict=True)):
        out[i, :, :ki] = v[:, :ki].to(F64)
    return out


def _pairs(top_gram: torch.Tensor, ks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """φ(K_ab, K_ab) and the smallest principal angle (degrees) for every pair, from the (N, N,
    K, K) blocks of the top-K Gram (zero beyond each member's rank)."""
    n, kk = top_gram.shape[0], top_gram.shape[2]
    kt = torch.tensor(ks, device=top_gram.device)
    kab = torch.minimum(kt[:, None], kt[None, :])  # (N, N)
    idx = torch.arange(kk, device=top_gram.device)
    inside = (idx[None, None, :] < kab[:, :, None]).to(F64)  # (N, N, K)
    sq = top_gram.square() * inside[:, :, :, None] * inside[:, :, None, :]
    phi = sq.sum((2, 3)) / kab.clamp_min(1)
    phi[kab == 0] = math.nan
    top = torch.linalg.svdvals(top_gram.reshape(n * n, kk, kk))[:, 0].reshape(n, n) if kk \
        else torch.zeros(n, n, dtype=F64, device=top_gram.device)
    angle = torch.rad2deg(torch.arccos(top.clamp(-1.0, 1.0)))
    angle[kab == 0] = math.nan
    return phi.cpu().numpy(), angle.cpu().numpy()


@dataclass
class _Prepared:
    """A module's N updates, solved: thin SVDs of the factored ones (stacked), dense matrices
    and top-K spectra of the others, and every update's K (its numerical rank, at most K)."""

    fac: list[int]
    mats: dict[int, torch.Tensor]
    u: list[torch.Tensor]
    v: list[torch.Tensor]
    ks: list[int]
    s_f: torch.Tensor | None = None
    u_f: torch.Tensor | None = None
    v_f: torch.Tensor | None = None


def _prepare(members: Sequence[Member], shape: tuple[int, int], k: int,
             device: torch.device) -> _Prepared:
    n = len(members)
    fac = [i for i, x in enumerate(members) if x.dense is None]
    values: list[torch.Tensor] = [torch.zeros(0)] * n
    u: list[torch.Tensor] = [torch.zeros(0)] * n
    v: list[torch.Tensor] = [torch.zeros(0)] * n
    s_f = u_f = v_f = None
    if fac:
        s_f, u_f, v_f = _thin([members[i] for i in fac], device)
        for j, i in enumerate(fac):
            values[i], u[i], v[i] = s_f[j], u_f[j], v_f[j]
    mats = {i: x.dense.to(device, F64) for i, x in enumerate(members) if x.dense is not None}
    for i, w in mats.items():
        sp = compute(w, vectors_k=min(k, *shape), device=device)
        assert sp.U is not None and sp.V is not None
        values[i], u[i], v[i] = sp.values, sp.U.to(device), sp.V.to(device)
    return _Prepared(fac, mats, u, v, _ranks(values, shape, k), s_f, u_f, v_f)


def _side(vecs: list[torch.Tensor], stacked: torch.Tensor | None, ks: list[int], kk: int) -> _Side:
    """One side's top-K Gram blocks: from the Gram of every factored update's full vectors
    ``stacked`` (N, dim, R) when all are factored (the top-K blocks are inside it), else from
    the stacked top-K vectors alone."""
    n = len(vecs)
    if stacked is not None:
        r = int(stacked.shape[2])
        blocks = _blocks(gram(stacked.permute(1, 0, 2).reshape(stacked.shape[1], -1)), n, r)
        inside = (torch.arange(kk, device=blocks.device)[None, :]
                  < torch.tensor(ks, device=blocks.device)[:, None]).to(F64)  # (N, kk)
        return _Side(blocks[:, :, :kk, :kk] * inside[:, None, :, None] * inside[None, :, None, :],
                     blocks)
    stack = _masked(vecs, ks, kk)
    return _Side(_blocks(gram(stack.permute(1, 0, 2).reshape(stack.shape[1], -1)), n, kk))


def module_stats(members: Sequence[Member], shape: tuple[int, int], k: int,
                 device: torch.device) -> ModuleStats:
    """The pairwise numbers and the shared-basis spectrum of N updates of one module (see the
    module docstring); ``k``: the subspace dimension K of φ and the angles."""
    p = _prepare(members, shape, k, device)
    kk = max(1, min(k, max(p.ks)))
    only_factored = not p.mats
    left = _side(p.u, p.u_f if only_factored else None, p.ks, kk)
    right = _side(p.v, p.v_f if only_factored else None, p.ks, kk)
    phi_l, ang_l = _pairs(left.top, p.ks)
    phi_r, ang_r = _pairs(right.top, p.ks)
    if left.full_gram is not None and right.full_gram is not None and p.s_f is not None:
        inner, bl, br = _factored_inner_basis(p.s_f, left.full_gram, right.full_gram)
    else:
        inner = _mixed_inner(members, p.mats, p.s_f, p.u_f, p.v_f, p.fac)
        bl, br = _mixed_basis(p.mats, p.s_f, p.u_f, p.v_f, shape)
    return ModuleStats(inner, phi_l, phi_r, ang_l, ang_r, _kab(p.ks), bl, br)


def _kab(ks: list[int]) -> np.ndarray:
    kt = np.asarray(ks, dtype=np.int64)
    return np.minimum(kt[:, None], kt[None, :])


def _factored_inner_basis(s: torch.Tensor, gu: torch.Tensor,
                          gv: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """⟨ΔWₐ, ΔW_b⟩ for all pairs and both shared-basis spectra, from σ (N, R) and the (N, N, R, R)
    blocks of the full-vector Grams."""
    ss = s[:, None, :, None] * s[None, :, None, :]  # sₐᵢ s_bⱼ
    inner = (ss * gu * gv).sum((2, 3))
    n, r = s.shape
    flat = s.reshape(-1)
    left, right = eigenvalues([blocks.permute(0, 2, 1, 3).reshape(n * r, n * r) * flat[:, None]
                               * flat[None, :] for blocks in (gu, gv)])
    return inner.cpu().numpy(), left, right


def _mixed_inner(members: Sequence[Member], mats: dict[int, torch.Tensor], s_f: torch.Tensor | None,
                 u_f: torch.Tensor | None, v_f: torch.Tensor | None, fac: list[int]) -> np.ndarray:
    """⟨ΔWₐ, ΔW_b⟩ when some updates are dense: dense·dense entrywise, dense·factored as
    Σ (D V_b) ⊙ (U_b S_b), factored pairs from their thin SVDs."""
    n = len(members)
    out = np.zeros((n, n))
    left = {i: u_f[j] * s_f[j] for j, i in enumerate(fac)} if s_f is not None and u_f is not None \
        else {}
    right = {i: v_f[j] for j, i in enumerate(fac)} if v_f is not None else {}
    for a in range(n):
        for b in range(a, n):
            if a in mats and b in mats:
                val = float((mats[a] * mats[b]).sum())
            elif a in mats or b in mats:
                d, f = (a, b) if a in mats else (b, a)
                val = float(((mats[d] @ right[f]) * left[f]).sum())
            else:
                val = float(((left[a].T @ left[b]) * (right[a].T @ right[b])).sum())
            out[a, b] = out[b, a] = val
    return out


def _mixed_basis(mats: dict[int, torch.Tensor], s_f: torch.Tensor | None, u_f: torch.Tensor | None,
                 v_f: torch.Tensor | None, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues of Σ ΔWₐΔWₐᵀ (m²) and Σ ΔWₐᵀΔWₐ (n²) when some updates are dense."""
    sums = []
    for side in (0, 1):
        dim = shape[side]
        dev = next(iter(mats.values())).device
        acc = torch.zeros(dim, dim, dtype=F64, device=dev)
        for w in mats.values():
            acc += w @ w.T if side == 0 else w.T @ w
        vecs = u_f if side == 0 else v_f
        if vecs is not None and s_f is not None:
            scaled = (vecs * s_f[:, None, :]).permute(1, 0, 2).reshape(dim, -1)
            acc += scaled @ scaled.T
        sums.append(acc)
    left, right = eigenvalues(sums)
    return left, right


__all__ = ["Member", "ModuleStats", "eigenvalues", "gram", "module_stats"]
