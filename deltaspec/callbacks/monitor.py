"""The live monitor behind the training callbacks, free of any training framework.

Every ``every`` optimiser steps :meth:`Monitor.step` reads the model's live parameters in place
(:mod:`deltaspec.loaders.sources.live`: a PeftModel's active adapter, or a full model against its base;
nothing is copied and no checkpoint is written), runs the core entry
(:func:`deltaspec.loop.run`: factored spectra, the metric table) and returns scalars per module
kind — the mean over that kind's modules of each metric asked for, and the mean φ(K, K) of the
left and right top-K singular vectors to the previous log point — under keys
``deltaspec/<kind>/<metric>``. ``fail_on`` holds bounds in the CI gate's syntax
(:mod:`deltaspec.gate.rules`: ``{"normalized_entropy": ">= 0.3"}``, or a rules file whose
``[bounds]`` and ``[kinds.X.bounds]`` apply); a module outside them is a stop, with the reason.
An analysis error is never a crash: one warning, and the monitor turns itself off.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deltaspec.errors import DeltaspecWarning, UsageError
from deltaspec.output import is_missing

DEFAULT_EVERY = 200  # optimiser steps between log points (≤ 1 % overhead: see RESULTS.md)
DEFAULT_METRICS = ("normalized_entropy", "effective_rank", "top1_share")
PREFIX = "deltaspec"
DRIFT_KEYS = ("phi_prev_left", "phi_prev_right")


def key(kind: str, metric: str) -> str:
    """The logged name of ``metric`` for module kind ``kind``.

    >>> key("q_proj", "normalized_entropy")
    'deltaspec/q_proj/normalized_entropy'
    """
    return f"{PREFIX}/{kind}/{metric}"


def _rules(fail_on: Any) -> Any:
    """``fail_on`` (None, a bounds mapping, a full rules mapping, or a rules file) → Rules."""
    if fail_on is None:
        return None
    from deltaspec.gate.rules import load_rules, parse_rules

    if isinstance(fail_on, (str, Path)):
        return load_rules(fail_on)
    if not isinstance(fail_on, Mapping):
        raise UsageError(f"fail_on: expected bounds like {{'top1_share': '<= 0.6'}} or a rules "
                         f"file, not {type(fail_on).__name__}")
    data = dict(fail_on)
    top = {"bounds", "kinds", "defaults", "ignore"}
    return parse_rules(data if set(data) & top else {"bounds": data}, "fail_on")


class Monitor:
    """See the module docstring. ``base``: the base of a full model (folder, module or state
    dict; default: the weights at :meth:`begin`, kept once on the CPU); ``options``: any
    :class:`~deltaspec.options.Options` field (``top_k``, ``include``, ``device``, …)."""

    def __init__(self, every: int = DEFAULT_EVERY, metrics: Sequence[str] = DEFAULT_METRICS,
                 k: int = 8, fail_on: Any = None, base: Any = None, **options: Any) -> None:
        from deltaspec.metrics.table import METRICS
        from deltaspec.options import make_options

        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise UsageError(f"every must be a positive integer, not {every!r}")
        unknown = [m for m in metrics if m not in METRICS or METRICS[m].group == "pairwise"]
        if unknown:
            raise UsageError(f"metrics: unknown {', '.join(unknown)} (known: "
                             f"{', '.join(m for m in METRICS if METRICS[m].group != 'pairwise')})")
        self.every, self.metrics, self.base = every, tuple(metrics), base
        self.opts = dataclasses.replace(make_options({"k": k, **options}, public=True),
                                        keep_spectra=True, vectors=True, discover_base=False)
        self.rules = _rules(fail_on)
        self.enabled = True
        self.last = -1  # the last log point (a step is logged once, whatever calls it)
        self.prev: dict[str, tuple[Any, Any]] = {}
        self.history: list[tuple[int, dict[str, float]]] = []

    def due(self, step: int) -> bool:
        """Whether ``step`` (optimiser steps done) is a log point."""
        return self.enabled and step > 0 and step % self.every == 0 and step != self.last

    def begin(self, model: Any) -> None:
        """At the start of training: a full model without a base keeps its weights as the base."""
        from deltaspec.loaders.sources.live import is_peft_model

        if self.base is None and model is not None and not is_peft_model(model):
            self.base = {n: p.detach().to("cpu", copy=True) for n, p in model.state_dict().items()}

    def measure(self, model: Any) -> tuple[dict[str, float], str | None]:
        """(scalars, the reason to stop or None) of the model as it is now. Raises on errors."""
        from deltaspec import metrics as M
        from deltaspec.loaders.registry import load_side
        from deltaspec.loop import run
        from deltaspec.plan import side

        o = self.opts
        read = dataclasses.replace(o, discover_base=False)  # the base: the model's own or given
        deltas = dict(load_side(side(model, self.base, read), read))
        if not any(m in ("relative_norm", "amplification", "intruders") for m in self.metrics):
            deltas = {n: dataclasses.replace(d, base=None) for n, d in deltas.items()}
        result = run(deltas, opts=o)
        per_kind: dict[str, list[dict[str, Any]]] = {}
        now: dict[str, tuple[Any, Any]] = {}
        rows = [dict(r) for r in result.rows.rows]  # pandas-free; the drift columns added here
        for rec in rows:
            sp = result.spectra[rec["module"]]
            r = min(o.k, M.numerical_rank(sp.values, sp.shape))
            u, v = sp.U[:, :r].cpu(), sp.V[:, :r].cpu()
            if rec["module"] in self.prev:
                pu, pv = self.prev[rec["module"]]
                rec["phi_prev_left"] = M.subspace_similarity(u, pu)
                rec["phi_prev_right"] = M.subspace_similarity(v, pv)
            now[rec["module"]] = (u, v)
            per_kind.setdefault(str(rec["kind"]), []).append(rec)
        self.prev = now
        logs = {}
        for kind, recs in sorted(per_kind.items()):
            for m in (*self.metrics, *DRIFT_KEYS):
                vals = [float(r[m]) for r in recs if m in r and not is_missing(r[m])]
                if vals:
                    logs[key(kind, m)] = sum(vals) / len(vals)
        return logs, self._violation(rows)

    def _violation(self, rows: list[dict[str, Any]]) -> str | None:
        """The first module outside a ``fail_on`` bound, as one line (None: all within)."""
        if self.rules is None:
            return None
        for rec in rows:
            if self.rules.ignored(rec["module"]):
                continue
            for metric, bound in self.rules.policy(str(rec["kind"])).bounds.items():
                value = rec.get(metric)
                if is_missing(value):
                    continue
                if bound.min is not None and value < bound.min:
                    return f"{rec['module']}: {metric} {value:.4g} < {bound.min:g} (fail_on)"
                if bound.max is not None and value > bound.max:
                    return f"{rec['module']}: {metric} {value:.4g} > {bound.max:g} (fail_on)"
        return None

    def step(self, model: Any, step: int) -> tuple[dict[str, float], str | None]:
        """At a log point: (scalars, stop reason). An analysis error warns once and disables the
        monitor (training goes on); a ``fail_on`` violation is returned as the stop reason."""
        self.last = step
        try:
            logs, stop = self.measure(model)
        except Exception as exc:  # noqa: BLE001 - never crash a training run on an analysis error
            self.enabled = False
            warnings.warn(f"warning: deltaspec monitor turned off at step {step}: "
                          f"{type(exc).__name__}: {exc}", DeltaspecWarning, stacklevel=2)
            return {}, None
        self.history.append((step, logs))
        if stop is not None:
            stop = f"deltaspec: stopping training at step {step}: {stop}"
            warnings.warn(stop, DeltaspecWarning, stacklevel=2)
        return logs, stop


__all__ = ["DEFAULT_EVERY", "DEFAULT_METRICS", "Monitor", "key"]
