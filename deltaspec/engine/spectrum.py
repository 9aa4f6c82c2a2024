"""Delta or matrix → exact singular values (and vectors). The only place that picks the algorithm,
the device and the dtype (the kernels live in :mod:`deltaspec.engine.kernels`).

Routes:
- **factored** (ΔW = B·A, R = inner rank < min(m, n)): QR of B and of Aᵀ, SVD of the R×R core
  R_B·R_Aᵀ, batched over modules of one shape. Exact σ; U = Q_B·U_c, V = Q_A·V_c. ΔW is never
  materialised.
- **gram** (dense values): the Gram matrix of the smaller side in float64 (block by block, from the
  stored dtype), a float64 symmetric eigensolver, σ = √max(λ, 0). A float32 Gram loses the small
  values. Which exact eigensolver (or a float64 bidiagonal SVD, route **svd**) is measured per
  machine (:mod:`deltaspec.engine.solvers`); the solves live in :mod:`deltaspec.engine.dense`.
- **gram+tridiag** (values and top-k vectors, CPU): one tridiagonal reduction of the Gram gives all
  values and, by inverse iteration and a back-transform of k vectors, the top-k vectors of that
  side; the other side is ΔW·V/σ. Where a wanted σ is below 1e-5·σ₁ that is inaccurate, and a
  float64 SVD (gesvd, route **svd**) is used instead.
- **gram** (all vectors, or top-k on CUDA): one ``eigh`` of the same Gram.
- **gram+randomized** (top-k vectors where the policy says ``evd``): subspace iteration on the Gram
  from a seeded random block, its length chosen from the exact eigenvalues and its Ritz residuals
  checked; σ stay exact (from ``eigvalsh``).
- **kronecker** (ΔW = W₁ ⊗ W₂, LoKr): σ are the pairwise products σᵢ(W₁)·σⱼ(W₂) of the factors'
  float64 SVDs; top vectors are u₁ᵢ ⊗ u₂ⱼ, v₁ᵢ ⊗ v₂ⱼ. Exact; ΔW is never materialised for it.
- **zero** matrices are answered without a solver.
Values come back as float64 on the CPU, descending, padded with exact zeros to min(m, n); the
same numbers (to ~1e-12) whatever the device.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from deltaspec.delta import Delta, KronFactor, check_finite, weights_dtype
from deltaspec.engine import dense, kernels, routes
from deltaspec.engine.kernels import Operand
from deltaspec.engine.kronecker import kron_solve
from deltaspec.errors import UsageError


@dataclass(frozen=True)
class Spectrum:
    """Singular values (float64, CPU, descending) and, when asked, vectors.

    ``U`` is (m, k) and ``V`` is (n, k) with ΔW ≈ U·diag(values[:k])·Vᵀ; ``route`` names the
    algorithm that produced them.
    """

    values: torch.Tensor
    shape: tuple[int, int]
    route: str
    U: torch.Tensor | None = None
    V: torch.Tensor | None = None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` → the first CUDA device when there is one, else the CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise UsageError(f"unknown device {device!r} ({exc})") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r}: deltaspec runs on 'cpu' or 'cuda[:i]'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {device!r} asked for, but CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def spectrum(x: Delta | torch.Tensor, k: int | None = None, vectors: bool = False,
             device: str | torch.device | None = None) -> Spectrum:
    """Exact singular values (top ``k``, or all) and, with ``vectors=True``, U and V.

    Args:
        x: a :class:`Delta` (factored ones stay factored) or a 2-D tensor.
        k: keep the top k values (and vectors); None keeps all min(m, n).
        vectors: also return U (m, k) and V (n, k).
        device: "auto" (default: CUDA when present), "cpu", "cuda", "cuda:1", …

    >>> import torch
    >>> spectrum(torch.diag(torch.tensor([3.0, 1.0, 2.0]))).values.tolist()
    [3.0, 2.0, 1.0]
    """
    if k is not None and k < 1:
        raise UsageError(f"k must be a positive integer, not {k}")
    sp = compute(x, vectors_k=(k if k is not None else -1) if vectors else 0, device=device)
    return completed(truncate(sp, k)) if k is not None else sp


def completed(sp: Spectrum) -> Spectrum:
    """``sp`` with one U and V column per value: when the rank is below k (a rank-4 LoRA asked
    for k = 8), the zero singular values get orthonormal columns orthogonal to the others, as an
    SVD's do. Those columns are an arbitrary basis of the null space (see :func:`complete_basis`):
    compare subspaces over the numerical rank only, as deltaspec's own metrics do."""
    if sp.U is None or sp.V is None or sp.U.shape[1] >= sp.values.numel():
        return sp
    n = sp.values.numel()
    return Spectrum(sp.values, sp.shape, sp.route, complete_basis(sp.U, n),
                    complete_basis(sp.V, n))


def complete_basis(q: torch.Tensor, k: int) -> torch.Tensor:
    """``q`` (m, r) with orthonormal columns, extended to (m, min(k, m)) by orthonormal columns
    orthogonal to it. The new columns come from a Gaussian block seeded by ``q``'s own bytes,
    projected off ``q`` twice and orthonormalised: deterministic for one ``q``, and two unrelated
    updates get unrelated completions (a fixed basis such as e_{r+1}, … would make them look
    alike to a subspace similarity).

    >>> import torch
    >>> q = complete_basis(torch.eye(4, 1, dtype=torch.float64), 3)
    >>> torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64))
    True
    """
    m, r = q.shape
    k = min(k, m)
    if r >= k:
        return q[:, :k]
    seed = zlib.crc32(q.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    gen = torch.Generator().manual_seed(seed)
    block = torch.randn(m, k - r, generator=gen, dtype=torch.float64).to(q.device, q.dtype)
    for _ in range(2):  # twice: one projection leaves rounding-sized components along q
        block = block - q @ (q.T @ block)
    rest, _ = torch.linalg.qr(block)  # (m, k - r), orthonormal and ⟂ q
    return torch.cat([q, rest], dim=1)


def truncate(sp: Spectrum, k: int) -> Spectrum:
    """The top-k part of a spectrum."""
    if k < 1:
        raise UsageError(f"k must be a positive integer, not {k}")
    cut = lambda t: None if t is None else t[:, :k]  # noqa: E731
    return Spectrum(sp.values[:k], sp.shape, sp.route, cut(sp.U), cut(sp.V))


def route(d: Delta) -> str:
    """The route that solves ``d``: "kronecker", "factored" (inner rank below min(m, n)) or
    "dense" (Gram / SVD; zero matrices are found there): :func:`deltaspec.engine.routes.choose`,
    the one place this is decided."""
    return routes.choose(factored=d.is_factored, inner_rank=d.rank_bound, shape=d.shape,
                         kronecker=d.is_kronecker)


def is_factored_route(d: Delta) -> bool:
    """True when ``d`` is solved through its factors (inner rank below min(m, n))."""
    return route(d) == "factored"


def operand(d: Delta, device: torch.device,
            move: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Operand:
    """ΔW of ``d`` as an :class:`Operand` on ``device``: its factors, its stored (fine-tuned,
    base) pair when the loader exposes one (``Delta.parts``: moved as stored, up-cast on the
    device), else its dense float32 matrix. ``move`` (tensor → tensor) overrides ``.to(device)``."""
    if move is None:
        move = lambda t: t.to(device)  # noqa: E731
    if d.is_factored:
        b, a = d.factors(torch.float32)
        return Operand(d.shape, device, d.label, factored=[(move(b), move(a))])
    parts = getattr(d, "parts", None)
    if parts is not None:
        tuned, base = parts()
        return Operand(d.shape, device, d.label, dense=[(1.0, move(tuned)), (-1.0, move(base))])
    return Operand(d.shape, device, d.label, dense=[(1.0, move(d.dense(torch.float32)))])


def compute(x: Delta | torch.Tensor, *, vectors_k: int = 0,
            device: str | torch.device | None = None) -> Spectrum:
    """All singular values, plus the top ``vectors_k`` vectors (-1: all, 0: none)."""
    dev = resolve_device(device)
    if isinstance(x, Delta):
        if route(x) == "kronecker":
            return solve_kronecker(x, vectors_k, dev)
        if route(x) == "factored":
            b, a = x.factors(torch.float32)
            return solve_factored(b[None].to(dev), a[None].to(dev), [x.shape], vectors_k)[0]
        return solve_dense(operand(x, dev), vectors_k)
    if x.ndim != 2:
        raise UsageError(f"spectrum needs a 2-D matrix, got shape {tuple(x.shape)}")
    m = check_finite(weights_dtype(x, "matrix", integers=True, error=UsageError), "matrix")
    shape = (m.shape[0], m.shape[1])
    return solve_dense(Operand(shape, dev, "matrix", dense=[(1.0, m.to(dev))]), vectors_k)


def _pad(values: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(k, dtype=torch.float64)
    out[: min(values.numel(), k)] = values.to("cpu", torch.float64)[:k]
    return out


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to("cpu", torch.float64)


def zero_spectrum(shape: tuple[int, int], vectors_k: int) -> Spectrum:
    """The spectrum of an all-zero update: values 0, no vectors."""
    empty = torch.zeros(0, dtype=torch.float64)
    u = torch.zeros(shape[0], 0, dtype=torch.float64) if vectors_k else None
    v = torch.zeros(shape[1], 0, dtype=torch.float64) if vectors_k else None
    return Spectrum(_pad(empty, min(shape)), shape, "zero", u, v)


def solve_dense(op: Operand, vectors_k: int,
                pre: tuple[torch.Tensor, bool] | None = None) -> Spectrum:
    """The spectrum of a dense (or too-high-rank factored) operand (``pre``: its Gram matrix)."""
    if pre is None and (0 in op.shape or op.is_zero()):
        op.check_finite()
        return zero_spectrum(op.shape, vectors_k)
    if pre is None and not dense.wants_gram(op):  # a bidiagonal route: no Gram to underflow
        res = dense.dense_solve(op, vectors_k, None)
        return Spectrum(_pad(res.values, min(op.shape)), op.shape, res.route, _cpu(res.U),
                        _cpu(res.V))
    pre = pre if pre is not None else kernels.gram(op)
    op, f = kernels.rescaled(op, pre[0])  # a tiny matrix's Gram underflows: scale first
    res = dense.dense_solve(op, vectors_k, pre if f == 1.0 else None)
    values = res.values if f == 1.0 else res.values / f
    return Spectrum(_pad(values, min(op.shape)), op.shape, res.route, _cpu(res.U), _cpu(res.V))


def solve_factored(b: torch.Tensor, a: torch.Tensor, shapes: list[tuple[int, int]],
                   vectors_k: int) -> list[Spectrum]:
    """Spectra of N factored updates Bᵢ·Aᵢ of one shape, stacked as B (N, m, R), A (N, R, n)."""
    res = kernels.factored_batch(b, a, vectors_k)
    values = res.values.to("cpu", torch.float64)
    us, vs = _cpu(res.U), _cpu(res.V)
    out = []
    for i, shape in enumerate(shapes):
        if not res.nonzero[i]:
            out.append(zero_spectrum(shape, vectors_k))
            continue
        u = None if us is None else us[i]
        v = None if vs is None else vs[i]
        out.append(Spectrum(_pad(values[i], min(shape)), shape, "factored", u, v))
    return out


def solve_kronecker(d: Delta, vectors_k: int, device: torch.device) -> Spectrum:
    """The spectrum of a Kronecker delta W₁ ⊗ W₂ from its factors (on ``device``)."""
    def move(f: KronFactor) -> KronFactor:
        return (f[0].to(device), f[1].to(device)) if isinstance(f, tuple) else f.to(device)

    w1, w2 = d.kron_factors(torch.float64)  # small: the SVDs run in float64 anyway
    res = kron_solve(move(w1), move(w2), vectors_k)
    if not bool(res.values.any()):
        return zero_spectrum(d.shape, vectors_k)
    return Spectrum(_pad(res.values, min(d.shape)), d.shape, "kronecker", _cpu(res.U), _cpu(res.V))
