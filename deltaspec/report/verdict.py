"""The report's headline numbers and its written verdict: does entropy order LoRA < MultiLoRA ≤ full?

The verdict compares the mean (over the modules common to every update) normalised singular-value
entropy of each update, over the top K values with one K for all updates (so that a rank-r LoRA and
a full fine-tune are compared over the same number of directions). The same comparison over all
values (normalised by ln min(m, n)) is reported beside it.

Every consecutive pair of the expected order is also compared with its uncertainty
(:mod:`deltaspec.report.uncertainty`): the mean difference with a bootstrap interval over modules
(and over runs, when a method is given as several seeds), an effect size and a three-way verdict
— holds / reversed / inconclusive — and the chain gets the combined ``status``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from deltaspec.errors import UsageError
from deltaspec.names import match_key
from deltaspec.report import uncertainty as U

ROLES = ("lora", "multilora", "full")
ROLE_NAMES = {"lora": "LoRA", "multilora": "MultiLoRA", "full": "full FT"}
PRIMARY = "normalized_entropy_topk"
SECONDARY = "normalized_entropy"

# Metric-table columns averaged per update (``_topk``: over the top K values); the verdict's two
# also get their spread across modules (``*_std``).
SUMMARY_METRICS = (PRIMARY, SECONDARY, "effective_rank_topk", "effective_rank", "stable_rank",
                   "top1_share")
SPREAD = (PRIMARY, SECONDARY)
SUMMARY_COLUMNS = ("label", "method", "modules", "runs",
                   *(c for m in SUMMARY_METRICS for c in (m, f"{m}_std")[: 2 if m in SPREAD else 1]))


def summary_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per label: means over its modules (``*_std``: standard deviation across modules)."""
    rows = []
    for label, g in metrics.groupby("label", observed=True, sort=True):
        methods = sorted(set(g["method"].dropna().astype(str)))
        n_runs = int(g["run"].nunique()) if "run" in g else 1
        row: dict[str, Any] = {"label": str(label), "method": "+".join(methods),
                               "modules": len(g) // n_runs, "runs": n_runs}
        for m in SUMMARY_METRICS:
            row[m] = g[m].mean()
            if m in SPREAD:
                row[f"{m}_std"] = g[m].std(ddof=0)
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
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
    """The expected ascending order of entropy and how it was found.

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


def holds(values: Sequence[float]) -> bool:
    """First < second ≤ third ≤ …: the shape of 'LoRA < MultiLoRA ≤ full FT'."""
    if any(math.isnan(v) for v in values):
        return False
    return values[0] < values[1] and all(a <= b for a, b in zip(values[1:], values[2:], strict=False))


def digits(values: Sequence[float]) -> int:
    """Decimals (3 to 6) enough to print distinct values distinctly.

    >>> digits([0.98012, 0.98049])
    4
    """
    vals = [v for v in values if not math.isnan(v)]
    for d in range(3, 7):
        shown = [f"{v:.{d}f}" for v in vals]
        if all(a != b for i, a in enumerate(shown) for b, w in zip(shown[i + 1:], vals[i + 1:],
                                                                      strict=False) if w != vals[i]):
            return d
    return 6


def _sign(a: float, b: float) -> str:
    """The observed relation between two values, as printed in the verdict."""
    if math.isnan(a) or math.isnan(b):
        return "?"
    return "<" if a < b else ("=" if a == b else ">")


def _chain(order: Sequence[str], values: Mapping[str, float]) -> str:
    """The values in the expected order, joined by the relations actually observed."""
    d = digits([values[lb] for lb in order])
    parts = [f"{order[0]} {values[order[0]]:.{d}f}"]
    for prev, label in zip(order, order[1:], strict=False):
        parts.append(f"{_sign(values[prev], values[label])} {label} {values[label]:.{d}f}")
    return " ".join(parts)


def _relation(order: Sequence[str]) -> str:
    return " ".join([order[0]] + [f"{'<' if i == 0 else '≤'} {lb}" for i, lb in enumerate(order[1:])])


def _failure(order: Sequence[str], values: Mapping[str, float]) -> str:
    d = digits([values[lb] for lb in order])
    for i, (a, b) in enumerate(zip(order, order[1:], strict=False)):
        if (values[a] >= values[b]) if i == 0 else (values[a] > values[b]):
            return f"{b} ({values[b]:.{d}f}) is not above {a} ({values[a]:.{d}f})"
    return "a value is undefined"


def _runs_by_module(metrics: pd.DataFrame, label: str, metric: str) -> pd.DataFrame:
    """(runs × module key) values of ``metric`` for ``label``."""
    g = metrics[metrics["label"].astype(str) == label]
    runs = g["run"] if "run" in g else pd.Series(0, index=g.index)
    frame = pd.DataFrame({"run": runs.to_numpy(), "key": [match_key(str(m)) for m in g["module"]],
                          "v": g[metric].astype(float).to_numpy()})
    return frame.pivot_table(index="run", columns="key", values="v", aggfunc="mean")


def compare_pairs(metrics: pd.DataFrame, order: Sequence[str], metric: str = PRIMARY,
                  level: float = U.LEVEL, seed: int = U.SEED) -> list[dict[str, Any]]:
    """Each consecutive pair (a, b) of ``order``: b − a with its interval, effect size, verdict."""
    out = []
    for a, b in zip(order, order[1:], strict=False):
        ta, tb = _runs_by_module(metrics, a, metric), _runs_by_module(metrics, b, metric)
        common = [c for c in ta.columns if c in tb.columns]
        ta, tb = ta[common].dropna(), tb[common].dropna()
        if not common or ta.empty or tb.empty:
            continue
        res = U.bootstrap_difference(ta.to_numpy(), tb.to_numpy(), level=level, seed=seed)
        out.append({"a": a, "b": b, "metric": metric, "expected": f"{b} > {a}", **res})
    return out


def _pairs_text(pairs: Sequence[Mapping[str, Any]]) -> str:
    if not pairs:
        return ""
    level = f"{pairs[0]['level']:.0%}"
    parts = [f"{p['b']} − {p['a']} = {p['diff']:+.4f} [{level} CI {p['ci_low']:+.4f}, "
             f"{p['ci_high']:+.4f}], d_z {p['effect_size']:+.2f}: {p['verdict']}" for p in pairs]
    runs = max(max(p["n_runs"]) for p in pairs)
    how = "modules" + (" and runs" if runs > 1 else "")
    return (f"With uncertainty (bootstrap over {how}): " + "; ".join(parts) + ". ")


_STATUS = {
    "holds": "Verdict: {relation} HOLDS at the {level} level.",
    "reversed": "Verdict: {relation} is REVERSED at the {level} level.",
    "inconclusive": "Verdict: INCONCLUSIVE at the {level} level: the data cannot tell whether "
                    "{relation} holds.",
}


def verdict(summary: pd.DataFrame, top_k: int, order: Sequence[str] | None = None,
            metrics: pd.DataFrame | None = None) -> dict[str, Any]:
    """The verdict as a dict: expected order, values, whether it holds, and a paragraph (``text``).

    With the per-module ``metrics``, also ``pairs`` (each consecutive pair of the expected order
    with its difference, interval, effect size and verdict) and ``status``: holds / reversed /
    inconclusive for the whole chain at the stated ``level``.
    """
    labels = list(summary["label"])
    primary = dict(zip(labels, summary[PRIMARY].astype(float), strict=False))
    secondary = dict(zip(labels, summary[SECONDARY].astype(float), strict=False))
    methods = dict(zip(labels, summary["method"].astype(str), strict=False))
    expected, how = expected_order(labels, methods, order)
    n_mod = int(summary["modules"].min()) if len(summary) else 0
    intro = (f"Mean normalised singular-value entropy over the top K={top_k} singular values (one K "
             f"for every update, so ranks are comparable), averaged over {n_mod} module(s) common "
             "to every update")
    ranking = sorted(labels, key=lambda lb: primary[lb])
    out: dict[str, Any] = {
        "metric": PRIMARY, "top_k": top_k, "expected_order": expected, "order_source": how,
        "values": primary, "values_all": secondary, "ranking": ranking, "holds": None,
        "holds_all_values": None, "status": None, "level": U.LEVEL, "pairs": [],
    }
    if not expected:
        d = digits(list(primary.values()))
        observed = " ≤ ".join(f"{lb} {primary[lb]:.{d}f}" for lb in ranking)
        out["text"] = (f"{intro}, lowest first: {observed}. No expected ordering was checked: {how} "
                       "(name the updates lora/multilora/full, or pass --order a,b,c).")
        return out
    out["holds"] = holds([primary[lb] for lb in expected])
    out["holds_all_values"] = holds([secondary[lb] for lb in expected])
    if metrics is not None:
        out["pairs"] = compare_pairs(metrics, expected)
        out["status"] = U.combine([p["verdict"] for p in out["pairs"]])
    relation = _relation(expected)
    roles = _relation([ROLE_NAMES.get(_role(lb) or "", lb) for lb in expected])
    text = f"{intro}: {_chain(expected, primary)}. "
    if out["status"] is not None:
        text = (f"{_STATUS[out['status']].format(relation=relation, level=f'{U.LEVEL:.0%}')} "
                f"{text}{_pairs_text(out['pairs'])}Point estimates alone: ")
    if out["holds"]:
        text += f"The expected ordering {relation} holds on these checkpoints"
    else:
        text += (f"The expected ordering {relation} does NOT hold on these checkpoints: "
                 f"{_failure(expected, primary)}")
    text += f" (order {how}: {roles}). "
    d = digits([secondary[lb] for lb in expected])
    all_vals = ", ".join(f"{lb} {secondary[lb]:.{d}f}" for lb in expected)
    text += (f"Over all singular values (normalised by ln min(m, n)): {all_vals}; the ordering "
             f"{'holds' if out['holds_all_values'] else 'does not hold'} there.")
    out["text"] = text
    return out


__all__ = ["compare_pairs", "expected_order", "holds", "summary_table", "verdict"]
