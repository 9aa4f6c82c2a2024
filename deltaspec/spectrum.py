"""Delta or matrix → exact singular values (and vectors). The only place that picks the algorithm,
the device and the dtype.

Routes:
- **factored** (ΔW = B·A, R = inner rank < min(m, n)): QR of B and of Aᵀ, SVD of the R×R core
  R_B·R_Aᵀ. Exact σ; U = Q_B·U_c, V = Q_A·V_c. ΔW is never materialised.
- **dense values**: the Gram matrix of the smaller side in float64, float64 ``eigvalsh``,
  σ = √max(λ, 0). (A float32 Gram loses the small singular values.)
- **dense vectors**: ``eigh`` of the same Gram gives V (or U); the other side is ΔW·V/σ. Where a
  wanted σ is too small for that to be accurate, a float64 SVD (gesvd) is used instead.
- **top-k vectors of a large dense matrix**: randomised range finder (q = k + 16, 6 power
  iterations with re-orthonormalisation); σ stay exact (from the Gram).
- **zero** matrices are answered without a solver.
Values come back as float64 on the CPU, descending, padded with exact zeros to min(m, n).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaspec.delta import Delta, check_finite
from deltaspec.errors import UsageError

# σ_i below this fraction of σ_1 makes U = ΔW·V/σ inaccurate: such vectors come from gesvd.
_VECTOR_RTOL = 1e-5
_RANDOMIZED_MIN_DIM = 1024  # below this, exact eigh is cheap enough
_OVERSAMPLE, _POWER_ITERS = 16, 6


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
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but CUDA is not available here")
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
    sp = compute(x, vectors_k=(k if k is not None else -1) if vectors else 0, device=device)
    return truncate(sp, k) if k is not None else sp


def truncate(sp: Spectrum, k: int) -> Spectrum:
    """The top-k part of a spectrum."""
    if k < 1:
        raise UsageError(f"k must be a positive integer, not {k}")
    cut = lambda t: None if t is None else t[:, :k]  # noqa: E731
    return Spectrum(sp.values[:k], sp.shape, sp.route, cut(sp.U), cut(sp.V))


def compute(x: Delta | torch.Tensor, *, vectors_k: int = 0,
            device: str | torch.device | None = None) -> Spectrum:
    """All singular values, plus the top ``vectors_k`` vectors (-1: all, 0: none)."""
    dev = resolve_device(device)
    if isinstance(x, Delta):
        if x.is_factored and x.rank_bound < min(x.shape):
            b, a = x.factors(torch.float32)
            return _factored(b.to(dev), a.to(dev), vectors_k)
        m = x.dense(torch.float32)
    else:
        if x.ndim != 2:
            raise UsageError(f"spectrum needs a 2-D matrix, got shape {tuple(x.shape)}")
        m = check_finite(x, "matrix")
    return _dense(m.to(dev), vectors_k)


def _pad(values: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(k, dtype=torch.float64)
    out[: values.numel()] = values.to("cpu", torch.float64)[:k]
    return out


def _zero(shape: tuple[int, int], vectors_k: int) -> Spectrum:
    empty = torch.zeros(0, dtype=torch.float64)
    u = torch.zeros(shape[0], 0, dtype=torch.float64) if vectors_k else None
    v = torch.zeros(shape[1], 0, dtype=torch.float64) if vectors_k else None
    return Spectrum(_pad(empty, min(shape)), shape, "zero", u, v)


def _factored(b: torch.Tensor, a: torch.Tensor, vectors_k: int) -> Spectrum:
    shape = (b.shape[0], a.shape[1])
    b, a = b.to(torch.float64), a.to(torch.float64)
    if not bool(b.any()) or not bool(a.any()):
        return _zero(shape, vectors_k)
    qb, rb = torch.linalg.qr(b)  # (m, R), (R, R)
    qa, ra = torch.linalg.qr(a.T)  # (n, R), (R, R)
    core = rb @ ra.T  # (R, R): ΔW = Q_B · core · Q_Aᵀ
    if not vectors_k:
        return Spectrum(_pad(torch.linalg.svdvals(core), min(shape)), shape, "factored")
    uc, s, vch = torch.linalg.svd(core)
    kk = s.numel() if vectors_k < 0 else min(vectors_k, s.numel())
    u = (qb @ uc[:, :kk]).cpu()
    v = (qa @ vch.T[:, :kk]).cpu()
    return Spectrum(_pad(s, min(shape)), shape, "factored", u, v)


def _gram(m: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Float64 Gram of the smaller side; True when it is MᵀM (n ≤ m)."""
    m64 = m.to(torch.float64)
    tall = m64.shape[0] >= m64.shape[1]
    return (m64.T @ m64 if tall else m64 @ m64.T), tall


def _dense(m: torch.Tensor, vectors_k: int) -> Spectrum:
    shape = (m.shape[0], m.shape[1])
    if m.numel() == 0 or not bool(m.any()):
        return _zero(shape, vectors_k)
    g, tall = _gram(m)
    kmin = min(shape)
    kk = kmin if vectors_k < 0 else min(vectors_k, kmin)
    if not kk:
        lam = torch.linalg.eigvalsh(g).flip(0)
        return Spectrum(_pad(lam.clamp_min(0).sqrt(), kmin), shape, "gram")
    if kk * 8 <= kmin and kmin >= _RANDOMIZED_MIN_DIM:
        lam = torch.linalg.eigvalsh(g).flip(0)
        s = lam.clamp_min(0).sqrt()
        u, v = _randomized(m.to(torch.float64), kk)
        return Spectrum(_pad(s, kmin), shape, "gram+randomized", u.cpu(), v.cpu())
    lam, w = torch.linalg.eigh(g)
    lam, w = lam.flip(0), w.flip(1)
    s = lam.clamp_min(0).sqrt()
    if s[kk - 1] <= s[0] * _VECTOR_RTOL:
        return _svd(m, kk)
    w = w[:, :kk]
    m64 = m.to(torch.float64)
    other = (m64 @ w if tall else m64.T @ w) / s[:kk]  # ΔW·V/σ (or ΔWᵀ·U/σ)
    u, v = (other, w) if tall else (w, other)
    return Spectrum(_pad(s, kmin), shape, "gram", u.cpu(), v.cpu())


def _svd(m: torch.Tensor, kk: int) -> Spectrum:
    """Float64 SVD (gesvd), for vectors where the Gram route is ill-conditioned."""
    m64 = m.to(torch.float64)
    driver = "gesvd" if m64.is_cuda else None
    u, s, vh = torch.linalg.svd(m64, full_matrices=False, driver=driver)
    return Spectrum(_pad(s, min(m.shape)), (m.shape[0], m.shape[1]), "svd",
                    u[:, :kk].cpu(), vh[:kk].T.cpu())


def _randomized(m: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular vectors by a randomised range finder with power iterations (float64)."""
    gen = torch.Generator(device=m.device).manual_seed(0)
    q = min(k + _OVERSAMPLE, min(m.shape))
    omega = torch.randn(m.shape[1], q, dtype=m.dtype, device=m.device, generator=gen)  # (n, q)
    y, _ = torch.linalg.qr(m @ omega)  # (m, q)
    for _ in range(_POWER_ITERS):
        z, _ = torch.linalg.qr(m.T @ y)  # (n, q)
        y, _ = torch.linalg.qr(m @ z)  # (m, q)
    small = y.T @ m  # (q, n)
    uh, _, vh = torch.linalg.svd(small, full_matrices=False)
    return (y @ uh)[:, :k], vh[:k].T
