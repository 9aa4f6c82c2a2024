"""Tables, comparisons and figures of the democracy sweep, rebuilt from its ``runs.jsonl``.

Every number of ``tables.md`` (and of the tables in ``analyses/democracy_sweep.md``) comes from
here: per arm, the mean over seeds with a 95 % Student-t interval; per compared pair, the
difference of means with a Welch 95 % interval, Hedges' g and a three-way verdict (holds: the
interval lies on the expected side of 0; reversed: on the other side; inconclusive: it holds 0).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95
TASKS = ("reverse", "upper", "sort", "repeat", "parity", "sentiment", "capital")
METRICS = {  # column: (heading, decimals)
    "normalized_entropy_topk": ("top-16 norm. entropy", 4),
    "effective_rank_topk": ("top-16 eff. rank", 2),
    "top1_share": ("top-1 energy", 3),
    "top8_share": ("top-8 energy", 3),
    "accuracy_mean": ("held-out acc.", 3),
}
# (a, b, metric, expected sign of b − a, the claim tested)
PAIRS = (
    ("lora", "multilora-n4", "normalized_entropy_topk", +1, "MultiLoRA (n=4) flatter than LoRA"),
    ("lora", "multilora-n4", "top1_share", -1, "MultiLoRA (n=4) less top-1 dominated than LoRA"),
    ("lora", "full", "normalized_entropy_topk", +1, "full FT flatter than LoRA"),
    ("multilora-n4", "full", "normalized_entropy_topk", +1, "full FT flatter than MultiLoRA"),
    ("multilora-n1", "multilora-n8", "normalized_entropy_topk", +1, "more modules (n 1 → 8) flatter"),
    ("multilora-n4-lorainit", "multilora-n4", "normalized_entropy_topk", +1,
     "MultiLoRA init flatter than LoRA init (n=4)"),
    ("multilora-n1-lorainit", "multilora-n1", "normalized_entropy_topk", +1,
     "MultiLoRA init flatter than LoRA init (n=1)"),
    ("lora", "multilora-n1", "normalized_entropy_topk", +1, "n=1 MultiLoRA flatter than LoRA"),
    ("lora", "multilora-n4", "accuracy_mean", +1, "MultiLoRA (n=4) more accurate than LoRA"),
    ("multilora-n4-lorainit", "multilora-n4", "accuracy_mean", +1,
     "MultiLoRA init more accurate than LoRA init (n=4)"),
)


ORDER = ("lora", "multilora-n1", "multilora-n2", "multilora-n4", "multilora-n8", "full",
         "multilora-n4-lorainit", "multilora-n1-lorainit")
UNIT = ("normalized_entropy", "share", "acc")  # columns bounded by [0, 1]: intervals are clipped


def load_runs(path: Path) -> pd.DataFrame:
    """One row per (arm, seed); per-task accuracies as ``acc_<task>`` columns."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        r.pop("per_module", None)
        r |= {f"acc_{t}": v for t, v in r.pop("accuracy").items()}
        rows.append(r)
    return pd.DataFrame(rows)


def mean_ci(x: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and Student-t interval over seeds ((mean, nan, nan) below 2 values)."""
    x = np.asarray(x, dtype=float)
    m = float(x.mean()) if x.size else math.nan
    if x.size < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return m, m - half, m + half


def welch(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """b − a: mean difference, Welch interval, Hedges' g (pooled SD, small-sample corrected)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    d = float(b.mean() - a.mean())
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": d, "lo": d, "hi": d, "g": math.nan}
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    half = stats.t.ppf(0.5 + level / 2, dof) * se
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1))
                       / (a.size + b.size - 2))
    corr = 1 - 3 / (4 * (a.size + b.size) - 9)
    return {"diff": d, "lo": d - half, "hi": d + half, "g": d / pooled * corr if pooled else math.nan}


def three_way(lo: float, hi: float, sign: int) -> str:
    """holds / reversed / inconclusive for an interval of b − a and the expected sign."""
    if sign * lo > 0 and sign * hi > 0:
        return "holds"
    if sign * lo < 0 and sign * hi < 0:
        return "reversed"
    return "inconclusive"


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: seeds, and mean / lo / hi of every metric, accuracy and cost column."""
    cols = [*METRICS, *(f"acc_{t}" for t in TASKS), "tokens_per_s", "peak_memory_mb",
            "steps_run", "best_step", "trainable_params"]
    rows = []
    names = sorted(set(runs["variant"]), key=lambda v: (ORDER.index(v) if v in ORDER else 99, v))
    for name in names:
        g = runs[runs["variant"] == name]
        row: dict[str, Any] = {"variant": name, "n": int(g["n"].iloc[0]), "seeds": len(g)}
        for c in cols:
            m, lo, hi = mean_ci(g[c].to_numpy())
            top = 1.0 if any(u in c for u in UNIT) else math.inf
            row[c], row[f"{c}_lo"], row[f"{c}_hi"] = m, max(lo, 0.0), min(hi, top)
        rows.append(row)
    return pd.DataFrame(rows)


def comparisons(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Every pair of :data:`PAIRS` whose two arms have ≥ 2 seeds each."""
    out = []
    for a, b, metric, sign, claim in PAIRS:
        xa = runs.loc[runs["variant"] == a, metric].to_numpy()
        xb = runs.loc[runs["variant"] == b, metric].to_numpy()
        if xa.size < 2 or xb.size < 2:
            continue
        w = welch(xa, xb)
        out.append({"a": a, "b": b, "metric": metric, "claim": claim, "seeds": [xa.size, xb.size],
                    **w, "level": LEVEL, "verdict": three_way(w["lo"], w["hi"], sign)})
    return out


def n_trend(runs: pd.DataFrame, metric: str = "normalized_entropy_topk") -> dict[str, float] | None:
    """Least-squares slope of ``metric`` on log2 n over the MultiLoRA-init arms, with its CI."""
    sel = runs[(runs["method"] == "multilora") & (runs["init"] == "multilora")]
    if sel["n"].nunique() < 2 or len(sel) < 3:
        return None
    fit = stats.linregress(np.log2(sel["n"].to_numpy(float)), sel[metric].to_numpy(float))
    half = stats.t.ppf(0.5 + LEVEL / 2, len(sel) - 2) * fit.stderr
    return {"metric": metric, "slope_per_doubling": fit.slope, "lo": fit.slope - half,
            "hi": fit.slope + half, "runs": len(sel)}


def _cell(row: pd.Series, col: str, dec: int) -> str:
    lo, hi = row[f"{col}_lo"], row[f"{col}_hi"]
    ci = "" if math.isnan(lo) else f" [{lo:.{dec}f}, {hi:.{dec}f}]"
    return f"{row[col]:.{dec}f}{ci}"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def tables_md(runs: pd.DataFrame) -> str:
    """The sweep's tables as Markdown (what the write-up embeds)."""
    if runs.empty:
        return "_no finished runs yet_\n"
    s = summary(runs)
    demo_rows = [[r.variant, str(r.seeds), *(_cell(r, c, d) for c, (_, d) in METRICS.items())]
                 for _, r in s.iterrows()]
    parts = [f"Mean over seeds [{LEVEL:.0%} t-interval, clipped to the quantity's range]; "
             "entropy and effective rank over the top "
             "K = 16 singular values, energy shares over all of them; each seed's value is the "
             f"mean over its {int(runs['modules'].iloc[0])} modules.\n",
             _md(["arm", "seeds", *(h for h, _ in METRICS.values())], demo_rows)]
    acc_rows = [[r.variant, *(_cell(r, f"acc_{t}", 2) for t in TASKS)] for _, r in s.iterrows()]
    parts += ["\nHeld-out exact-match accuracy per task:\n", _md(["arm", *TASKS], acc_rows)]
    cost_rows = [[r.variant, f"{r.trainable_params:,.0f}", _cell(r, "tokens_per_s", 0),
                  _cell(r, "peak_memory_mb", 1), _cell(r, "steps_run", 0), _cell(r, "best_step", 0)]
                 for _, r in s.iterrows()]
    parts += ["\nCost and length (tokens/s with two runs side by side, one thread each, on the "
              "sweep's 2 cores; steps run: where the stopping rule ended the run; best step: "
              "the evaluated parameters it ends on):\n",
              _md(["arm", "trainable params", "tokens/s", "peak memory (MiB)", "steps run",
                   "best step"], cost_rows)]
    cmp_rows = [[c["claim"], f"{c['b']} − {c['a']}", c["metric"], f"{c['diff']:+.4f}",
                 f"[{c['lo']:+.4f}, {c['hi']:+.4f}]", f"{c['g']:+.2f}", c["verdict"]]
                for c in comparisons(runs)]
    parts += [f"\nComparisons (difference of means, Welch {LEVEL:.0%} interval, Hedges' g):\n",
              _md(["claim", "difference", "metric", "mean", "interval", "g", "verdict"], cmp_rows)]
    trend = n_trend(runs)
    if trend:
        parts.append(f"\nEntropy against n (MultiLoRA init, {trend['runs']} runs): slope "
                     f"{trend['slope_per_doubling']:+.4f} per doubling of n "
                     f"[{trend['lo']:+.4f}, {trend['hi']:+.4f}].")
    return "\n".join(parts) + "\n"


def _figure(runs: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(runs)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), constrained_layout=True)
    x = np.arange(len(s))
    for ax, col in zip(axes[:3], ("normalized_entropy_topk", "top1_share", "accuracy_mean"),
                       strict=True):
        err = np.vstack([s[col] - s[f"{col}_lo"], s[f"{col}_hi"] - s[col]])
        ax.errorbar(x, s[col], yerr=np.nan_to_num(err), fmt="o", capsize=3)
        for xi, name in zip(x, s["variant"], strict=True):
            pts = runs.loc[runs["variant"] == name, col]
            ax.plot(np.full(len(pts), xi + 0.15), pts, ".", color="0.6", ms=4)
        ax.set_xticks(x, s["variant"], rotation=60, ha="right", fontsize=8)
        ax.set_title(METRICS[col][0])
        if col != "normalized_entropy_topk":
            ax.set_ylim(0, 1)
    ml = s[s["variant"].str.fullmatch(r"multilora-n\d+")].sort_values("n")
    ax = axes[3]
    ax.plot(ml["n"], ml["tokens_per_s"] / 1e3, "o-", label="tokens/s (k)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("n (MultiLoRA modules)")
    ax.set_ylabel("k tokens/s")
    ax2 = ax.twinx()
    ax2.plot(ml["n"], ml["peak_memory_mb"], "s--", color="C1", label="peak MiB")
    ax2.set_ylabel("peak memory (MiB)")
    if not ml.empty:  # from 0: the spread between arms is noise
        ax.set_ylim(0, 1.25 * float(ml["tokens_per_s"].max()) / 1e3)
        ax2.set_ylim(0, 1.25 * float(ml["peak_memory_mb"].max()))
    ax.set_title("cost vs n")
    fig.savefig(path, dpi=110)
    plt.close(fig)


_MARK = re.compile(r"(<!-- tables:start -->\n).*?(<!-- tables:end -->)", re.S)
_CLAIMS = re.compile(r"(<!-- claims:start -->\n).*?(<!-- claims:end -->)", re.S)
_WORDS = {"holds": "**holds**", "reversed": "**reversed** (the opposite is supported)",
          "inconclusive": "**inconclusive** (the interval contains 0)"}


def claims_md(runs: pd.DataFrame) -> str:
    """One line per tested claim: its verdict and the numbers behind it."""
    lines = [f"- {c['claim']}: {_WORDS[c['verdict']]} — {c['b']} − {c['a']} on {c['metric']} = "
             f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], Hedges' g {c['g']:+.2f}, "
             f"{c['seeds'][0]} and {c['seeds'][1]} seeds." for c in comparisons(runs)]
    trend = n_trend(runs)
    if trend:
        verdict = three_way(trend["lo"], trend["hi"], +1)
        lines.append(f"- Entropy grows with n (MultiLoRA init): {_WORDS[verdict]} — slope "
                     f"{trend['slope_per_doubling']:+.4f} per doubling of n "
                     f"[{trend['lo']:+.4f}, {trend['hi']:+.4f}] over {trend['runs']} runs.")
    return "\n".join(lines) + "\n"


def render_all(runs_file: Path, out: Path, writeup: Path | None) -> None:
    """Rebuild summary.csv, results.json, tables.md, sweep.png (and the write-up's tables)."""
    runs = load_runs(runs_file)
    md = tables_md(runs)
    (out / "tables.md").write_text(md)
    if runs.empty:
        return
    summary(runs).to_csv(out / "summary.csv", index=False, float_format="%.6g")
    results = {"level": LEVEL, "summary": summary(runs).to_dict("records"),
               "comparisons": comparisons(runs), "n_trend": n_trend(runs)}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    _figure(runs, out / "sweep.png")
    if writeup is not None and writeup.exists():
        text = writeup.read_text()
        text = _MARK.sub(lambda m: m.group(1) + md + m.group(2), text)
        claims = claims_md(runs)
        writeup.write_text(_CLAIMS.sub(lambda m: m.group(1) + claims + m.group(2), text))
