"""The one row builder: one module's row of the result table — identity, the metric table's
spectral metrics, the base-relative ones, and (a comparison) the pairwise ones — for both
executors of a plan (:mod:`deltaspec.engine.host` builds from σ alone, :mod:`deltaspec.loop`
from a solved :class:`~deltaspec.engine.pipeline.Solved`). Imports no torch until a base-relative
or pairwise metric is asked for.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from deltaspec import columns as cols
from deltaspec import metrics as M
from deltaspec.metrics.spectral import descending
from deltaspec.options import Options

if TYPE_CHECKING:
    from deltaspec.delta import Delta
    from deltaspec.engine.kernels import Operand
    from deltaspec.engine.pipeline import Solved
    from deltaspec.engine.relative import BaseEigs
    from deltaspec.engine.spectrum import Spectrum

INTRUDER_TOP = 10  # Shuttleworth et al. look at the top-10 singular vectors of W + ΔW


def side_metrics(values: Any, shape: tuple[int, int], opts: Options,
                 rank_bound: int | None = None) -> dict[str, Any]:
    """The metric table's spectral metrics of σ ``values`` (numpy or torch) of a ``shape`` update,
    over the top ``opts.top_k`` values when set (capped at the update's structural ``rank_bound``,
    with a warning: :func:`deltaspec.metrics.within.cap_k`); with ``opts.heavy_tail``, the
    heavy-tail α of ΔW's spectral density (over every value).

    >>> import numpy as np
    >>> side_metrics(np.array([2.0, 0.0]), (2, 3), Options())["rank"]
    1
    """
    out: dict[str, Any] = M.spectral_metrics(values, shape, opts.top_k, rank_bound)
    if opts.heavy_tail:
        out["alpha"] = M.alpha(descending(values), shape)
    return out


def untrained_notes(rows: list[dict[str, Any]]) -> list[str]:
    """The note an ``analyze`` result ends with when some modules have ΔW ≡ 0
    (:func:`deltaspec.metrics.untrained_note`), as a list (empty: none)."""
    note = M.untrained_note(rows)
    return [note] if note else []


def sigma(sp: Spectrum) -> Any:
    """The singular values of ``sp`` as a fresh float64 numpy array (never a view that keeps a
    larger solver buffer alive)."""
    import numpy as np
    import torch

    return np.array(sp.values.to("cpu", torch.float64).numpy(), dtype=np.float64, copy=True)


def identity(d: Delta) -> dict[str, Any]:
    """The identity columns of a delta (route: the engine's one route choice)."""
    from deltaspec.engine.spectrum import route

    return cols.identity(d.name, d.method, d.shape, d.rank_bound, route(d))


def base_metrics(sp: Spectrum, fro: float, op: Operand, w: Operand, opts: Options,
                 eigs: BaseEigs) -> dict[str, Any]:
    """relative_norm, amplification, intruders: the metric functions of
    :mod:`deltaspec.metrics.base_relative` fed the reductions of W they need, formed blockwise by
    the engine (‖W‖_F, the r×r projection U_rᵀ·W·V_r), so W is never copied to float64 whole."""
    import torch

    from deltaspec.engine import relative

    w_fro = math.sqrt(w.fro2())
    if not math.isfinite(w_fro):
        w.check_finite()
    r = min(opts.k, M.numerical_rank(sp.values, sp.shape))
    u, v = sp.U, sp.V
    proj = relative.projection(w, u[:, :r], v[:, :r]) if r and u is not None and v is not None \
        else torch.zeros(0, 0)
    return {"relative_norm": M.relative_norm(fro, w_fro), "amplification": M.amplification(fro, proj),
            "intruders": intruders(sp, op, w, eigs) if opts.intruders else math.nan}


def intruders(sp: Spectrum, op: Operand, w: Operand, eigs: BaseEigs) -> int:
    """Intruder dimensions of W + ΔW against W: ``relative.intruder_cosines`` gives C = |U_Wᵀ·u_t|
    without forming U_W, and :func:`deltaspec.metrics.intruders` counts over it. ``eigs``: W's
    decompositions already made (a compare's two sides share their base's)."""
    from deltaspec.engine import relative

    if op.is_zero():
        return 0
    cos = relative.intruder_cosines(w, w.plus(op), INTRUDER_TOP, hint=(sp.U, sp.V), eig=eigs.of(w),
                                    shift=float(sp.values[0]))
    return M.intruders(cos.to("cpu"))


def _solved_side(s: Solved, i: int, opts: Options, with_base: bool, eigs: BaseEigs) -> dict[str, Any]:
    from deltaspec.engine import health

    sp, w = s.spectra[i], s.bases[i]
    part = side_metrics(sp.values, sp.shape, opts, s.deltas[i].rank_bound)
    if with_base and w is not None:
        part |= base_metrics(sp, M.fro_norm(sp.values), s.ops[i], w, opts, eigs)
        part |= health.base_columns(sp, s.ops[i], w, opts, eigs)
    return part


def row(s: Solved, opts: Options, with_base: bool) -> dict[str, Any]:
    """One module's ``analyze`` row."""
    from deltaspec.engine.relative import BaseEigs

    return identity(s.deltas[0]) | _solved_side(s, 0, opts, with_base, BaseEigs())


def compare_row(s: Solved, opts: Options, with_base: bool) -> dict[str, Any]:
    """One module's ``compare`` row: shared identity, each side's columns (``_a``, ``_b``), the
    pairwise ones."""
    from deltaspec.engine.relative import BaseEigs

    ident = identity(s.deltas[0])
    out: dict[str, Any] = {c: ident[c] for c in cols.IDENTITY if c not in cols.PER_SIDE_IDENTITY}
    eigs = BaseEigs()  # one eigh of W when both sides have the same base
    for i, side in enumerate(("a", "b")):
        d = s.deltas[i]
        part = {c: identity(d)[c] for c in cols.PER_SIDE_IDENTITY}
        part |= _solved_side(s, i, opts, with_base, eigs)
        out |= {f"{c}_{side}": v for c, v in part.items()}
    return out | pairwise(s, opts.k)


def pairwise(s: Solved, k: int) -> dict[str, float]:
    """cosine, φ(K, K) left and right, smallest principal angles of one module's two sides."""
    from deltaspec.engine import relative

    (sa, sb), (op_a, op_b) = s.spectra, s.ops
    ra = min(k, M.numerical_rank(sa.values, sa.shape))
    rb = min(k, M.numerical_rank(sb.values, sb.shape))
    assert sa.U is not None and sb.U is not None and sa.V is not None and sb.V is not None
    ua, ub, va, vb = sa.U[:, :ra], sb.U[:, :rb], sa.V[:, :ra], sb.V[:, :rb]
    fa, fb = M.fro_norm(sa.values), M.fro_norm(sb.values)
    inner = relative.frobenius_inner(op_a, op_b) if fa > 0 and fb > 0 else 0.0
    return {
        "cosine": M.cosine(inner, fa, fb),
        "subspace_sim_left": M.subspace_similarity(ua, ub),
        "subspace_sim_right": M.subspace_similarity(va, vb),
        "min_angle_left": M.min_angle_degrees(ua, ub),
        "min_angle_right": M.min_angle_degrees(va, vb),
    }


__all__ = ["INTRUDER_TOP", "base_metrics", "compare_row", "identity", "intruders", "pairwise",
           "row", "side_metrics", "sigma", "untrained_notes"]
