"""Tables, comparisons and figures of the democracy sweep, rebuilt from its ``runs.jsonl``.

Every number of ``tables.md`` (and of the tables in ``analyses/democracy_sweep.md``) comes from
here: per arm, the mean over seeds with a 95 % Student-t interval; per claim, the difference of
seed-level means with a Welch 95 % interval, Hedges' g, a two-sided p, its Holm adjustment over
all the claims, and a three-way verdict from the adjusted p (:mod:`deltaspec.report.seeds`: the
same code as the report's). Nulls (a random update of the same shape and rank; full FT's update
projected on a random rank-16 input subspace; MultiLoRA with equalised |sᵢ|) are columns
``<kind>.<metric>`` of the same runs, compared by the same code.
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

from deltaspec.report.seeds import compare_seeds, holm  # noqa: F401  (holm: for the tests)
from deltaspec.report.seeds import welch as welch  # re-exported: the tests check it against scipy

LEVEL = 0.95
PRIMARY = "share1_of_r"
TASKS = ("reverse", "upper", "sort", "repeat", "parity", "sentiment", "capital")
METRICS = {  # column: (heading, decimals); the K-resolved ones within the top r = 16
    "share1_of_r": ("top-1 share in top 16 (primary)", 4),
    "entropy_top2": ("top-2 entropy", 4),
    "entropy_top4": ("top-4 entropy", 4),
    "entropy_top8": ("top-8 entropy", 4),
    "entropy_top16": ("top-16 entropy", 4),
    "accuracy_mean": ("held-out acc.", 3),
}
DESCRIPTIVE = {  # all-σ quantities: capped by the rank, never in a claim
    "top1_share": ("top-1 share, all σ", 3),
    "normalized_entropy_all": ("entropy, all σ", 3),
}
NULL_COLUMNS = ("random.share1_of_r", "projected.share1_of_r", "equalised.share1_of_r",
                "random.entropy_top4", "projected.entropy_top4", "equalised.entropy_top4")
# (arm a, column of a, arm b, column of b, expected sign of b − a, the claim tested)
PAIRS = (
    ("lora", PRIMARY, "multilora-n4", PRIMARY, -1,
     "PRIMARY: MultiLoRA (n=4) less top-1 dominated than LoRA"),
    ("lora", "entropy_top4", "multilora-n4", "entropy_top4", +1,
     "MultiLoRA (n=4) flatter than LoRA in its top 4"),
    ("lora", PRIMARY, "full", PRIMARY, -1, "full FT less top-1 dominated than LoRA"),
    ("multilora-n4", PRIMARY, "full", PRIMARY, -1, "full FT less top-1 dominated than MultiLoRA"),
    ("lora", PRIMARY, "full", f"projected.{PRIMARY}", -1,
     "full FT less dominated than LoRA beyond rank (full FT projected on a rank-16 subspace)"),
    ("multilora-n4", f"equalised.{PRIMARY}", "multilora-n4", PRIMARY, +1,
     "the spread of MultiLoRA's scalings makes it more top-1 dominated"),
    ("lora", PRIMARY, "multilora-n4", f"equalised.{PRIMARY}", -1,
     "MultiLoRA (n=4) with equalised scalings less top-1 dominated than LoRA"),
    ("lora", "accuracy_mean", "multilora-n4", "accuracy_mean", +1,
     "MultiLoRA (n=4) more accurate than LoRA"),
)


ORDER = ("lora", "multilora-n1", "multilora-n2", "multilora-n4", "multilora-n8", "full",
         "multilora-n4-lorainit", "multilora-n1-lorainit")
UNIT = ("entropy", "share", "acc")  # columns bounded by [0, 1]: intervals are clipped


def load_runs(path: Path) -> pd.DataFrame:
    """One row per (arm, seed); per-task accuracies as ``acc_<task>`` columns."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        r.pop("per_module", None)
        r |= {f"acc_{t}": v for t, v in r.pop("accuracy").items()}
        r |= {f"{kind}.{k}": v for kind, vals in r.pop("nulls", {}).items() for k, v in vals.items()}
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


def three_way(lo: float, hi: float, sign: int) -> str:
    """holds / reversed / inconclusive for an interval and the expected sign (unadjusted)."""
    if sign * lo > 0 and sign * hi > 0:
        return "holds"
    if sign * lo < 0 and sign * hi < 0:
        return "reversed"
    return "inconclusive"


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per arm: seeds, and mean / lo / hi of every metric, accuracy and cost column."""
    cols = [*METRICS, *DESCRIPTIVE, *(c for c in NULL_COLUMNS if c in runs),
            *(f"acc_{t}" for t in TASKS), "tokens_per_s", "peak_memory_mb", "steps_run",
            "best_step", "trainable_params"]
    rows = []
    names = sorted(set(runs["variant"]), key=lambda v: (ORDER.index(v) if v in ORDER else 99, v))
    for name in names:
        g = runs[runs["variant"] == name]
        row: dict[str, Any] = {"variant": name, "n": int(g["n"].iloc[0]), "seeds": len(g)}
        for c in cols:
            m, lo, hi = mean_ci(g[c].dropna().to_numpy())
            top = 1.0 if any(u in c for u in UNIT) else math.inf
            row[c], row[f"{c}_lo"], row[f"{c}_hi"] = m, max(lo, 0.0), min(hi, top)
        rows.append(row)
    return pd.DataFrame(rows)


def _values(runs: pd.DataFrame, arm: str, col: str) -> np.ndarray:
    if col not in runs:
        return np.array([])
    return runs.loc[runs["variant"] == arm, col].dropna().to_numpy(float)


def comparisons(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """Every claim of :data:`PAIRS` whose two sides have ≥ 2 seeds, Holm-adjusted together."""
    found = []
    for a, ca, b, cb, sign, claim in PAIRS:
        xa, xb = _values(runs, a, ca), _values(runs, b, cb)
        if xa.size >= 2 and xb.size >= 2:
            found.append(((a, ca, b, cb, sign, claim), (xa, xb, sign)))
    rows = compare_seeds([g for _, g in found], LEVEL)
    return [{"a": a, "b": b, "metric": cb if ca == cb else f"{cb} − {ca}", "claim": claim,
             "seeds": row.pop("n_runs"), **row} for ((a, ca, b, cb, _, claim), _), row
            in zip(found, rows, strict=True)]


def primary_interval(runs: pd.DataFrame) -> tuple[float, float] | None:
    """The Welch interval of the primary MultiLoRA − LoRA difference (None below 2 seeds each)."""
    if runs.empty:
        return None
    xa, xb = _values(runs, "lora", PRIMARY), _values(runs, "multilora-n4", PRIMARY)
    if xa.size < 2 or xb.size < 2:
        return None
    w = welch(xa, xb, LEVEL)
    return w["lo"], w["hi"]


def n_trend(runs: pd.DataFrame, metric: str = PRIMARY) -> dict[str, float] | None:
    """Least-squares slope of ``metric`` on log2 n over the MultiLoRA-init arms, with its CI."""
    sel = runs[(runs["method"] == "multilora") & (runs["init"] == "multilora")]
    if sel["n"].nunique() < 3 or len(sel) < 4:
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
             "every metric within the top r = 16 singular values (the adapters' rank: the same "
             "directions for every arm); each seed's value is the mean over its "
             f"{int(runs['modules'].iloc[0])} adapted linear layers (the modules every arm has).\n",
             _md(["arm", "seeds", *(h for h, _ in METRICS.values())], demo_rows)]
    desc = [[r.variant, *(_cell(r, c, d) for c, (_, d) in DESCRIPTIVE.items())]
            for _, r in s.iterrows()]
    parts += ["\nDescriptive only (over all singular values: capped by the rank, so a rank-16 "
              "update and a full-rank one differ here by construction; in no claim):\n",
              _md(["arm", *(h for h, _ in DESCRIPTIVE.values())], desc)]
    nulls = [c for c in NULL_COLUMNS if c in s]
    if nulls:
        null_rows = [[r.variant, *("—" if math.isnan(r[c]) else _cell(r, c, 4) for c in nulls)]
                     for _, r in s.iterrows()]
        parts += ["\nNulls, per arm (random: a Gaussian update of the arm's shape and structural "
                  "rank; projected: the arm's own ΔW·AᵀA, A a fresh Kaiming-uniform rank-16 matrix "
                  "(full FT only); equalised: the arm's MultiLoRA factors with equalised |sᵢ|):\n",
                  _md(["arm", *nulls], null_rows)]
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
                 f"[{c['lo']:+.4f}, {c['hi']:+.4f}]", f"{c['g']:+.2f}", f"{c['p']:.3g}",
                 f"{c['p_holm']:.3g}", c["verdict"]] for c in comparisons(runs)]
    parts += [f"\nClaims (difference of seed-level means, Welch {LEVEL:.0%} interval, Hedges' g, "
              "two-sided p and its Holm adjustment over every claim below; the verdict is from "
              "the adjusted p):\n",
              _md(["claim", "difference", "metric", "mean", "interval", "g", "p", "p (Holm)",
                   "verdict"], cmp_rows)]
    trend = n_trend(runs)
    if trend:
        parts.append(f"\nTop-1 share in top 16 against n (MultiLoRA init, {trend['runs']} runs): slope "
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
    for ax, col in zip(axes[:3], (PRIMARY, "entropy_top4", "accuracy_mean"), strict=True):
        err = np.vstack([s[col] - s[f"{col}_lo"], s[f"{col}_hi"] - s[col]])
        ax.errorbar(x, s[col], yerr=np.nan_to_num(err), fmt="o", capsize=3)
        for xi, name in zip(x, s["variant"], strict=True):
            pts = runs.loc[runs["variant"] == name, col]
            ax.plot(np.full(len(pts), xi + 0.15), pts, ".", color="0.6", ms=4)
        ax.set_xticks(x, s["variant"], rotation=60, ha="right", fontsize=8)
        ax.set_title(METRICS[col][0])
        if col == "accuracy_mean":
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
          "inconclusive": "**inconclusive** (not significant after Holm)"}


def claims_md(runs: pd.DataFrame) -> str:
    """One line per tested claim: its verdict and the numbers behind it."""
    lines = [f"- {c['claim']}: {_WORDS[c['verdict']]} — {c['b']} − {c['a']} on {c['metric']} = "
             f"{c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}], Hedges' g {c['g']:+.2f}, "
             f"p {c['p']:.3g} (Holm {c['p_holm']:.3g}), {c['seeds'][0]} and {c['seeds'][1]} seeds."
             for c in comparisons(runs)]
    trend = n_trend(runs)
    if trend:
        verdict = three_way(trend["lo"], trend["hi"], -1)
        lines.append(f"- Top-1 share falls with n (MultiLoRA init; unadjusted): {_WORDS[verdict]} — "
                     "slope "
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
