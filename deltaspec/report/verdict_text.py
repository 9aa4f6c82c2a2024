"""The verdict's paragraph, written from the verdict dict (:func:`deltaspec.report.verdict.verdict`)
so that the text can never say more than the status: "holds" / "REVERSED" appear only with that
status, a one-run comparison says plainly that its interval carries no seed variation and gives no
method verdict, and the all-σ numbers are labelled descriptive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

ONE_RUN = "one run per method"
ONE_RUN_NOTE = ("one run per method: this interval is over modules and says nothing about "
                "seed-to-seed variation")
_STATUS = {
    "holds": "Verdict: {relation} HOLDS at the {level} level ({how}).",
    "reversed": "Verdict: {relation} is REVERSED at the {level} level ({how}).",
    "inconclusive": "Verdict: INCONCLUSIVE at the {level} level ({how}): the runs cannot tell "
                    "whether {relation} holds.",
    ONE_RUN: "No method verdict: " + ONE_RUN_NOTE + ". Train several seeds per method and pass "
             "them as label=run1,run2,… for one.",
}


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


def headline(v: Mapping[str, Any]) -> str:
    """The one-line status of a verdict (the page's heading says the same).

    >>> headline({"status": "one run per method", "expected_order": ["lora", "full"]})
    'lora → full: no method verdict (one run per method)'
    """
    order = " → ".join(v.get("expected_order") or [])
    status = v.get("status")
    if status is None:
        return f"{order}: no verdict (no per-module data)" if order else "no expected order"
    if status == ONE_RUN:
        return f"{order}: no method verdict ({ONE_RUN})"
    return f"{order}: {status} at the {v.get('level', 0.95):.0%} level"


def _relation(order: Sequence[str]) -> str:
    """'a < b ≤ c' in democracy (the expected order, least democratic first)."""
    return " ".join([order[0]] + [f"{'<' if i == 0 else '≤'} {lb}" for i, lb in enumerate(order[1:])])


def _values(v: Mapping[str, Any], labels: Sequence[str]) -> str:
    vals = v["values"]
    d = digits([vals[lb] for lb in labels])
    return ", ".join(f"{lb} {vals[lb]:.{d}f}" for lb in labels)


def _interval(p: Mapping[str, Any]) -> str:
    if math.isnan(p.get("ci_low", math.nan)):
        return ""
    return f" [{p.get('level', 0.95):.0%} CI {p['ci_low']:+.4f}, {p['ci_high']:+.4f}]"


def _pair(p: Mapping[str, Any]) -> str:
    text = f"{p['b']} − {p['a']} = {p['diff']:+.4f}{_interval(p)}"
    if p.get("unit") == "seeds":
        return (f"{text}, Hedges' g {p['effect_size']:+.2f}, p {p['p']:.3g} (Holm {p['p_holm']:.3g}), "
                f"{p['n_runs'][0]} and {p['n_runs'][1]} runs: {p['verdict']}")
    return f"{text} over {p['n_modules']} modules"


def _nulls(v: Mapping[str, Any]) -> str:
    parts = [f"{n['b']} − {n['a']} {n['what']}: {n['diff']:+.4f}{_interval(n)} (observed "
             f"{n['observed']:+.4f})" for n in v.get("nulls") or []]
    return ("Beside the nulls: " + "; ".join(parts) + ". ") if parts else ""


def compose(v: Mapping[str, Any]) -> str:
    """The verdict paragraph (see the module docstring)."""
    labels = list(v["values"])
    expected = v["expected_order"]
    intro = (f"Mean {v['metric_title']} (r = {v['top_k']}, the smallest structural rank compared; "
             f"lower is more democratic), over {v['modules']} module(s) common to every update")
    if not expected:
        ranking = sorted(labels, key=lambda lb: -v["values"][lb])
        return (f"{intro}, least democratic first: {_values(v, ranking)}. No expected ordering was "
                f"checked: {v['order_source']} (name the updates lora/multilora/full, or pass "
                "--order a,b,c).")
    status = v.get("status")
    text = ""
    if status is not None:
        how = f"Welch's t over seed-level means, Holm over {len(v['pairs'])} pair(s)"
        text = _STATUS[status].format(relation=_relation(expected), level=f"{v['level']:.0%}",
                                      how=how) + " "
    runs = sorted(set(v.get("runs", {}).values())) or [1]
    text += (f"{intro} and {'/'.join(map(str, runs))} run(s) per method: "
             f"{_values(v, expected)} (expected order in democracy {_relation(expected)}, "
             f"{v['order_source']}). ")
    if v.get("pairs"):
        text += "Differences: " + "; ".join(_pair(p) for p in v["pairs"]) + ". "
    if status == ONE_RUN:
        text += ("The point values are " + ("" if v.get("point_order") else "not ")
                 + "in the expected order, which from one run per method is no evidence either "
                 "way. ")
    elif status is None:
        text += "No per-module data was given: no interval and no verdict. "
    text += _nulls(v)
    alls = v.get("values_all_descriptive") or {}
    if alls:
        d = digits([alls[lb] for lb in expected])
        text += ("Descriptive only, never a verdict: normalised entropy over all singular values "
                 "(capped by each update's rank at ln r / ln min(m, n)) " +
                 ", ".join(f"{lb} {alls[lb]:.{d}f}" for lb in expected) + ".")
    return text.strip()


__all__ = ["ONE_RUN", "ONE_RUN_NOTE", "compose", "digits", "headline"]
