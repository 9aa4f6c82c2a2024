r"""The numpy executor of a :class:`~deltaspec.plan.Plan`: one plain PEFT LoRA adapter in
safetensors, no base, on the CPU — chosen by :func:`deltaspec.plan.choose_executor`, which has
already read the header and decided every module's factor keys.

``import torch`` alone takes 1.4–3 s on a 2-core machine: more than the whole analysis of a
224-module adapter. This executor reads the factors with numpy (through the loaders' one header
reader, :mod:`deltaspec.loaders.header`) and solves each ΔW = s·B·A by the engine's own factored
algorithm (:func:`deltaspec.engine.kernels.factored_batch`):

.. math::  s·B = Q_B R_B,\quad A^\top = Q_A R_A,\quad σ(ΔW) = σ(R_B R_A^\top)

in float64 after the same float32 steps as the loader (bfloat16/float16 widened exactly, B·s
rounded to float32), padded with zeros to min(m, n). Rows come from the one row builder
(:mod:`deltaspec.rows`); the result is the same :class:`~deltaspec.result.Analysis` as the torch
executor's (tests/test_executors.py holds the two to LAPACK rounding on one plan).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, cast

import numpy as np

from deltaspec import columns as cols
from deltaspec.engine.blas import blas_threads
from deltaspec.errors import NumericalError
from deltaspec.loaders.header import read_float32
from deltaspec.loaders.peft import config as peft_config
from deltaspec.output import Rows
from deltaspec.result import Analysis
from deltaspec.rows import side_metrics, untrained_notes

if TYPE_CHECKING:
    from deltaspec.plan import Plan

# QR of a factor this narrow is a string of tiny steps: one BLAS thread is twice as fast on 2 cores
ONE_THREAD_RANK = 64


def run(plan: Plan) -> Analysis:
    """Execute ``plan`` (its executor is ``numpy``): one row and σ per selected module."""
    work = plan.host
    assert work is not None, plan.reason
    weights, config = work.weights, work.config
    rows, sigmas = [], {}
    with open(weights, "rb") as fh:
        for name, keys in work.modules.items():
            a = read_float32(fh, work.entries[keys["lora_A"]])
            b = read_float32(fh, work.entries[keys["lora_B"]])
            r, shape = a.shape[0], (b.shape[0], a.shape[1])  # r < min(shape): the plan checked
            b = b * np.float32(peft_config.scale(config, name, r))  # float32, as the loader's B·s
            for part, t in (("lora_A", a), ("lora_B", b)):
                if not np.isfinite(t).all():
                    raise NumericalError(f"{weights}: {keys[part]}: {int((~np.isfinite(t)).sum())} "
                                         f"NaN/Inf value(s) in a tensor of shape {t.shape}")
            values = factored_values(b, a)
            rows.append(cols.identity(name, "lora", shape, r, "factored")
                        | side_metrics(values, shape, plan.options, r))
            sigmas[name] = values
    return Analysis(rows=Rows(rows, cols.analyze_columns(False, plan.options.heavy_tail)),
                    sigmas=sigmas, notes=untrained_notes(rows), executor=plan.reason,
                    k=plan.options.k)


def factored_values(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """All min(m, n) singular values of B·A (B (m, R), A (R, n)), descending: QR of B and Aᵀ in
    float64, SVD of the R×R core; zeros past R.

    >>> b, a = np.array([[3.0], [0.0]]), np.array([[0.0, 2.0, 0.0]])
    >>> factored_values(b, a).tolist()
    [6.0, 0.0]
    """
    # Fortran order: LAPACK's own layout, so numpy's qr copies less (Aᵀ of a C-order A is one)
    with blas_threads(1, "numpy") if b.shape[1] <= ONE_THREAD_RANK else nullcontext():
        rb = cast(np.ndarray, np.linalg.qr(b.astype(np.float64, order="F"), mode="r"))  # R only
        ra = cast(np.ndarray, np.linalg.qr(a.astype(np.float64).T, mode="r"))
    core = rb @ ra.T  # (R, R): ΔW = Q_B · core · Q_Aᵀ
    out = np.zeros(min(b.shape[0], a.shape[1]))
    s = np.linalg.svd(core, compute_uv=False)[: out.size]
    out[: s.size] = s
    return out


__all__ = ["ONE_THREAD_RANK", "factored_values", "run"]
