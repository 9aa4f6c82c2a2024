"""One module's rank-k truncation ΔW_k = U_k·diag(σ_k)·V_kᵀ, by the spectral engine, and the
error of the tensors as saved.

- Factored inputs (LoRA, MultiLoRA, AdaLoRA, VeRA, FourierFT's factors, …): the engine's exact
  factored route (QR of B and Aᵀ, SVD of the small core) gives every σ and the vectors; ΔW is
  never formed. The saved error ‖B·A − B̂·Â‖_F comes from the stacked factors X = [B, −B̂],
  Y = [A; Â] as tr((XᵀX)(YYᵀ)), or from their QR where that would cancel (no dense matrix).
- Dense inputs (a full fine-tune minus its base, DoRA, IA³, OFT, LoHa, LoKr, …): one operand read
  once as stored; its float64 Gram (when the machine's solver route uses one) is formed once and
  serves both the values (which pick k) and the exact top-k vectors; the saved error is summed
  over float64 row blocks of ΔW − B̂·Â.

Every σ is exact, so ``energy_kept`` and ``rel_error`` (Eckart–Young: ‖ΔW − ΔW_k‖_F² = Σ_{i>k}σᵢ²)
are exact; ``saved_rel_error`` is measured on the factors rounded to the dtype written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from deltaspec.delta import Delta
from deltaspec.engine import dense, kernels
from deltaspec.engine.kernels import Operand
from deltaspec.engine.spectrum import compute, operand, resolve_device, solve_dense, zero_spectrum
from deltaspec.metrics.ranks import Policy
from deltaspec.metrics.spectral import descending

F64 = torch.float64
ROW_BLOCK_BYTES = 32 << 20  # one float64 block of the dense residual


@dataclass(frozen=True)
class Truncation:
    """One module truncated: its σ (float64, all of them), the rank kept, the factors
    ``b`` (m, k) = U_k·diag(σ_k) and ``a`` (k, n) = V_kᵀ in float64 on the CPU, and for a dense
    input the operand its tensors were read into (for :func:`saved_error`: not read twice)."""

    delta: Delta
    sigma: np.ndarray
    rank: int
    b: torch.Tensor
    a: torch.Tensor
    op: Operand | None = None

    def errors(self) -> tuple[float, float, float]:
        """(energy_kept, rel_error, sigma_next) from the exact spectrum; ΔW = 0 gives (1, 0, 0).

        The tail is summed directly (not 1 − kept), so a small error keeps its digits.
        """
        s = self.sigma / self.sigma[0] if self.sigma.size and self.sigma[0] > 0 else self.sigma[:0]
        if not s.size:
            return 1.0, 0.0, 0.0
        e = s * s
        total, tail = float(e.sum()), float(e[self.rank:].sum())
        nxt = float(s[self.rank]) if self.rank < s.size else 0.0
        return float(e[: self.rank].sum()) / total, math.sqrt(tail / total), nxt


def truncate(d: Delta, policy: Policy, device: str = "auto") -> Truncation:
    """The rank-k truncation of ``d`` with k = ``policy.rank(σ)`` (exact; see the module)."""
    dev = resolve_device(device)
    if d.is_factored:
        sp = compute(d, vectors_k=-1, device=dev)
        sigma = descending(sp.values)
        k = policy.rank(sigma, d.shape)
        return _kept(d, sigma, k, sp.U, sp.V)
    op = operand(d, dev)
    if op.is_zero():
        op.check_finite()
        sp = zero_spectrum(d.shape, 0)
        return _kept(d, descending(sp.values), 0, None, None, op)
    if policy.kind == "k" and policy.value is not None:  # k known before σ: one solve
        want = min(max(int(policy.value), policy.min_rank or 0), policy.max_rank or min(d.shape),
                   min(d.shape))
        sp = solve_dense(op, want)
        sigma = descending(sp.values)
        return _kept(d, sigma, policy.rank(sigma, d.shape), sp.U, sp.V, op)
    pre = kernels.gram(op) if dense.wants_gram(op) else None
    sigma = descending(solve_dense(op, 0, pre).values)
    k = policy.rank(sigma, d.shape)
    if not k:
        return _kept(d, sigma, 0, None, None, op)
    sp = solve_dense(op, k, pre)
    return _kept(d, sigma, k, sp.U, sp.V, op)


def _kept(d: Delta, sigma: np.ndarray, k: int, u: torch.Tensor | None, v: torch.Tensor | None,
          op: Operand | None = None) -> Truncation:
    m, n = d.shape
    if not k or u is None or v is None:
        return Truncation(d, sigma, 0, torch.zeros(m, 0, dtype=F64), torch.zeros(0, n, dtype=F64),
                          op)
    s = torch.from_numpy(sigma[:k].copy())
    b = u[:, :k].to("cpu", F64) * s
    a = v[:, :k].to("cpu", F64).T.contiguous()
    return Truncation(d, sigma, k, b.contiguous(), a, op)


def rounded(t: Truncation, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (B̂, Â) as written: ``b``, ``a`` rounded to ``dtype``."""
    return t.b.to(dtype).contiguous(), t.a.to(dtype).contiguous()


def saved_error(t: Truncation, b_hat: torch.Tensor, a_hat: torch.Tensor,
                device: str = "auto") -> float:
    """‖ΔW − B̂·Â‖_F / ‖ΔW‖_F of the factors as written (0 for ΔW = 0)."""
    total = math.sqrt(float((t.sigma.astype(np.float64) ** 2).sum()))
    if total == 0:
        return 0.0
    d = t.delta
    bh, ah = b_hat.to(F64), a_hat.to(F64)
    if d.is_factored:
        b, a = d.factors(F64)
        x, y = torch.cat([b, -bh], dim=1), torch.cat([a, ah], dim=0)
        if x.shape[1] >= min(x.shape[0], y.shape[1]):
            return float(torch.linalg.matrix_norm(x @ y)) / total
        # ‖X·Y‖²_F = tr((XᵀX)(YYᵀ)): small Gram products, no dense ΔW; where the error is
        # below 1e-5 that cancels, and the QR of the stacked factors gives it to full precision
        sq = float(((x.T @ x) * (y @ y.T)).sum())
        if sq > 1e-10 * total * total:
            return math.sqrt(sq) / total
        rx = torch.linalg.qr(x, mode="r")[1]
        ry = torch.linalg.qr(y.T, mode="r")[1]
        return float(torch.linalg.matrix_norm(rx @ ry.T)) / total
    op = t.op if t.op is not None else operand(d, resolve_device(device))
    bh, ah = bh.to(op.device), ah.to(op.device)
    m, n = d.shape
    step = max(1, ROW_BLOCK_BYTES // (8 * n))
    sq = 0.0
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        sq += float(((op.rows(lo, hi) - bh[lo:hi] @ ah) ** 2).sum())
    return math.sqrt(sq) / total


def params_in(d: Delta) -> int:
    """Parameters of the input's update: r·(m + n) for a factored one (r its inner rank), m·n
    for a dense or structured one.

    >>> from deltaspec.delta import factored
    >>> params_in(factored("q", (8, 4), lambda: None, method="lora", source="x", rank=2))
    24
    """
    m, n = d.shape
    return d.rank_bound * (m + n) if d.is_factored else m * n


__all__ = ["Truncation", "params_in", "rounded", "saved_error", "truncate"]
