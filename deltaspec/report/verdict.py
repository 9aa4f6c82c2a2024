"""The report's headline numbers and its written verdict: is LoRA's update the most dominated by its
top direction, MultiLoRA's less, full fine-tuning's least (LoRA < MultiLoRA ≤ full in democracy)?

What is measured: the pre-registered :data:`PRIMARY` metric, the top-1 energy share *within the top
r* singular values (r = the smallest structural rank compared, so every update is read over the
same number of directions, none padded with zeros); lower is more democratic. The K-resolved
metrics (:mod:`deltaspec.metrics.within`: entropy within the top K and top-t shares within the top
r, K ∈ {1, 2, 4, 8, r}) are shown beside it; the all-σ quantities (normalised by ln min(m, n)) are
descriptive only — capped by each update's rank, they differ between a rank-16 adapter and a
full fine-tune by construction — and never enter a verdict.

What decides: seeds are the unit. With ≥ 2 runs (seeds) of every compared method, each
consecutive pair of the expected order is compared by Welch's t on the seed-level means, Holm over
the pairs (:mod:`deltaspec.report.seeds`), and the chain gets one ``status``: holds / reversed /
inconclusive. With one run of some method there is no method verdict (``status`` =
:data:`ONE_RUN`): the module-level bootstrap interval is shown, and the page says that it carries
no seed-to-seed variation. ``holds`` is True / False only when the status is holds / reversed.
Beside each pair stand its nulls (:mod:`deltaspec.report.null_effects`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from deltaspec.errors import UsageError
from deltaspec.names import match_key
from deltaspec.report import seeds as SD
from deltaspec.report import uncertainty as U
from deltaspec.report.null_effects import null_effects, run_means
from deltaspec.report.verdict_text import ONE_RUN, ONE_RUN_NOTE, compose, digits

ROLES = ("lora", "multilora", "full")
ROLE_NAMES = {"lora": "LoRA", "multilora": "MultiLoRA", "full": "full FT"}
PRIMARY = "share1_of_r"  # pre-registered: the top-1 energy share within the top r values
PRIMARY_SIGN = -1  # a more democratic update has a lower share: b − a < 0 is expected
PRIMARY_TITLE = "top-1 energy share within the top r singular values"
SECONDARY = "normalized_entropy"  # over all values: descriptive only

# Metric-table columns averaged per update (``_topk``: over the top K values); the verdict's
# metric also gets its spread across modules (``*_std``). K-resolved columns are appended.
SUMMARY_METRICS = (PRIMARY, "normalized_entropy_topk", "effective_rank_topk", SECONDARY,
                   "effective_rank", "stable_rank", "top1_share")
SPREAD = (PRIMARY, "normalized_entropy_topk", SECONDARY)
_KCOL = re.compile(r"^(entropy_top\d+|share\d+_of_r)$")  # the K-resolved columns


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per label: means over its modules and runs (``*_std``: spread across modules),
    the verdict's metric first, then the K-resolved ones (``entropy_top*``, ``share*_of_r``)."""
    kcols = [c for c in metrics.columns if _KCOL.match(c) and c not in SUMMARY_METRICS]
    rows = []
    for label, g in metrics.groupby("label", observed=True, sort=True):
        methods = sorted(set(g["method"].dropna().astype(str)))
        n_runs = int(g["run"].nunique()) if "run" in g else 1
        row: dict[str, Any] = {"label": str(label), "method": "+".join(methods),
                               "modules": len(g) // n_runs, "runs": n_runs}
        for m in (*SUMMARY_METRICS, *kcols):
            row[m] = g[m].mean() if m in g else math.nan
            if m in SPREAD:
                row[f"{m}_std"] = g[m].std(ddof=0) if m in g else math.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.astype({"label": "string", "method": "string", "runs": "int64", "modules": "int64"})


def _role(text: str) -> str | None:
    t = text.lower()
    if "multilora" in t or "multi-lora" in t or "multi_lora" in t:
        return "multilora"
    if "lora" in t:
        return "lora"
    return "full" if "full" in t else None


def _by_role(names: Mapping[str, str]) -> dict[str, str] | None:
    """role → label when every role found is held by exactly one label (≥ 2 roles), else None."""
    found: dict[str, list[str]] = {}
    for label, name in names.items():
        role = _role(name)
        if role:
            found.setdefault(role, []).append(label)
    if len(found) < 2 or any(len(v) > 1 for v in found.values()):
        return None
    return {role: v[0] for role, v in found.items()}


def expected_order(labels: Sequence[str], methods: Mapping[str, str],
                   order: Sequence[str] | None = None) -> tuple[list[str], str]:
    """The expected order, least democratic first, and how it was found.

    ``order`` (explicit) wins; else labels containing "lora"/"multilora"/"full" (case-insensitive);
    else the methods the checkpoints declare. Returns ([], reason) when none applies.
    """
    if order is not None:
        order = [o.strip() for o in order if o.strip()]
        unknown = [o for o in order if o not in labels]
        if unknown:
            raise UsageError(f"--order: unknown label(s) {', '.join(unknown)} (labels: "
                             f"{', '.join(labels)})")
        if len(order) < 2 or len(set(order)) != len(order):
            raise UsageError("--order: give two or more distinct labels, e.g. lora,multilora,full")
        return list(order), "given order"
    for source, names in (("labels", {lb: lb for lb in labels}), ("checkpoint methods", methods)):
        roles = _by_role(names)
        if roles:
            return [roles[r] for r in ROLES if r in roles], f"matched by {source}"
    return [], "no order could be inferred from the labels or the checkpoints"


def in_order(values: Sequence[float], sign: int = PRIMARY_SIGN) -> bool:
    """Whether point values follow the expected order (first step strict, then non-strict) in the
    direction ``sign`` (−1: decreasing). Descriptive: it is not a verdict.

    >>> in_order([0.5, 0.4, 0.4]), in_order([0.4, 0.5], sign=+1), in_order([0.4, 0.5])
    (True, True, False)
    """
    v = [sign * x for x in values]
    if any(math.isnan(x) for x in v):
        return False
    return v[0] < v[1] and all(a <= b for a, b in zip(v[1:], v[2:], strict=False))


def _runs_by_module(metrics: pd.DataFrame, label: str, metric: str) -> pd.DataFrame:
    """(runs × module key) values of ``metric`` for ``label``."""
    g = metrics[metrics["label"].astype(str) == label]
    runs = g["run"] if "run" in g else pd.Series(0, index=g.index)
    frame = pd.DataFrame({"run": runs.to_numpy(), "key": [match_key(str(m)) for m in g["module"]],
                          "v": g[metric].astype(float).to_numpy()})
    return frame.pivot_table(index="run", columns="key", values="v", aggfunc="mean")


def _module_pair(metrics: pd.DataFrame, a: str, b: str, metric: str) -> dict[str, Any] | None:
    """One run per method: b − a with a module-level bootstrap interval and NO verdict."""
    ta, tb = _runs_by_module(metrics, a, metric), _runs_by_module(metrics, b, metric)
    common = [c for c in ta.columns if c in tb.columns]
    ta, tb = ta[common].dropna(), tb[common].dropna()
    if not common or ta.empty or tb.empty:
        return None
    r = U.bootstrap_difference(ta.to_numpy(), tb.to_numpy())
    return {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "level": r["level"],
            "effect_size": r["effect_size"], "effect_size_kind": r["effect_size_kind"],
            "n_modules": r["n_modules"], "n_runs": r["n_runs"], "unit": "modules",
            "verdict": None, "method": r["method"] + ": " + ONE_RUN_NOTE}


def compare_pairs(metrics: pd.DataFrame, order: Sequence[str], metric: str = PRIMARY,
                  sign: int = PRIMARY_SIGN) -> list[dict[str, Any]]:
    """Each consecutive pair (a, b) of ``order``: b − a, its interval and (over seeds) its verdict.

    Every method with ≥ 2 runs: Welch over seed-level means, Holm over the pairs. Otherwise the
    module-level bootstrap interval with ``verdict`` None (no method verdict from one run).
    """
    pairs = list(zip(order, order[1:], strict=False))
    means = {lb: run_means(metrics, lb, metric) for lb in order}
    base = [{"a": a, "b": b, "metric": metric, "expected": f"{b} {'<' if sign < 0 else '>'} {a}"}
            for a, b in pairs]
    if all(means[lb].size >= 2 for lb in order):
        rows = SD.compare_seeds([(means[a], means[b], sign) for a, b in pairs])
        return [p | {"ci_low": r["lo"], "ci_high": r["hi"], "effect_size": r["g"],
                     "effect_size_kind": "Hedges' g (seed-level)", "unit": "seeds",
                     **{k: r[k] for k in ("diff", "p", "p_holm", "level", "n_runs", "verdict",
                                          "method")}}
                for p, r in zip(base, rows, strict=True)]
    out = []
    for p, (a, b) in zip(base, pairs, strict=True):
        r = _module_pair(metrics, a, b, metric)
        if r is not None:
            out.append(p | r)
    return out


def status_of(pairs: Sequence[Mapping[str, Any]]) -> str | None:
    """The chain's status: :data:`ONE_RUN` when any pair has no method verdict, else
    reversed / holds / inconclusive (:func:`uncertainty.combine`); None without pairs."""
    if not pairs:
        return None
    if any(p["verdict"] is None for p in pairs):
        return ONE_RUN
    return U.combine([p["verdict"] for p in pairs])


def verdict(summary: pd.DataFrame, top_k: int, order: Sequence[str] | None = None,
            metrics: pd.DataFrame | None = None,
            nulls: pd.DataFrame | None = None) -> dict[str, Any]:
    """The verdict as a dict: expected order, values, pairs, ``status``, nulls and a paragraph.

    ``values``: per label the mean of :data:`PRIMARY`; with the per-module ``metrics`` also
    ``pairs`` (:func:`compare_pairs`), ``status`` (:func:`status_of`) and ``holds`` (True / False
    only for status holds / reversed, else None); with the ``nulls`` table (report data) also
    ``nulls``: each pair's difference with a side replaced by its null. ``point_order`` says only
    whether the point values are in the expected order. ``text`` never says more than the status.
    """
    labels = [str(x) for x in summary["label"]]
    col = summary[PRIMARY] if PRIMARY in summary else pd.Series(math.nan, index=summary.index)
    values = dict(zip(labels, col.astype(float), strict=True))
    expected, how = expected_order(labels, dict(zip(labels, summary["method"].astype(str),
                                                    strict=True)), order)
    kcols = [c for c in summary.columns if _KCOL.match(c)]
    out: dict[str, Any] = {
        "metric": PRIMARY, "metric_title": PRIMARY_TITLE, "sign": PRIMARY_SIGN, "top_k": top_k,
        "expected_order": expected, "order_source": how, "values": values,
        "runs": dict(zip(labels, summary["runs"].astype(int), strict=True)),
        "modules": int(summary["modules"].min()) if len(summary) else 0,
        "k_resolved": {lb: {c: float(v) for c, v in zip(kcols, row, strict=True)}
                       for lb, row in zip(labels, summary[kcols].to_numpy(float), strict=True)},
        "values_all_descriptive": dict(zip(labels, summary[SECONDARY].astype(float), strict=True)),
        "point_order": None, "holds": None, "status": None, "level": SD.LEVEL, "pairs": [],
        "nulls": []}
    if expected:
        out["point_order"] = in_order([values[lb] for lb in expected])
    if expected and metrics is not None:
        out["pairs"] = compare_pairs(metrics, expected)
        out["status"] = status_of(out["pairs"])
        out["holds"] = {"holds": True, "reversed": False}.get(out["status"] or "")
        if nulls is not None and not nulls.empty:
            out["nulls"] = null_effects(metrics, nulls, expected, PRIMARY)
    out["text"] = compose(out)
    return out

__all__ = ["ONE_RUN", "ONE_RUN_NOTE", "PRIMARY", "compare_pairs", "digits", "expected_order",
           "in_order", "run_means", "status_of", "summary_table", "verdict"]
