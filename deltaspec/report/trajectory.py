"""The HTML page of a training trajectory: figures (metric vs step, drift, layer × step heatmap),
the per-step kind means and the whole table as CSV, written like the democracy report (its page
helpers, its figure renderer, its all-or-nothing output folder)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from deltaspec.report.html import STYLE, FigureFile, _figure, _section, _toc, table_html
from deltaspec.report.write import GENERATOR, _render, atomic_dir, check_out_dir

TABLE = "trajectory.csv"
SHOWN = ("normalized_entropy", "effective_rank", "top1_share", "phi_final_left", "phi_prev_left",
         "cosine_final", "norm_change")


def step_means(df: pd.DataFrame) -> pd.DataFrame:
    """Mean per (step, module kind) of the main metric and drift columns (the page's table).

    >>> t = pd.DataFrame({"step": [1, 1, 2], "kind": ["q"] * 3, "top1_share": [.25, .75, .25]})
    >>> step_means(t).values.tolist()
    [[1, 'q', 2, 0.5], [2, 'q', 1, 0.25]]
    """
    shown = [c for c in SHOWN if c in df.columns]
    g = df.assign(kind=df["kind"].astype(str)).groupby(["step", "kind"], sort=True)
    out = g[shown].mean(numeric_only=False).astype(float)
    out.insert(0, "modules", g.size())
    return out.reset_index()


def figures(df: pd.DataFrame, metric: str) -> list[FigureFile]:
    """The page's figures, rendered to PNG."""
    from deltaspec import plots as P

    specs = [
        ("metric_vs_step", f"{metric} over training",
         f"{metric} against the step, one panel per module kind: median across layers, band "
         "10–90 % of layers.", lambda: P.plot_trajectory(df, metric)),
        ("drift", "Drift over training",
         "φ(K, K) between the top-K left singular vectors of each checkpoint's update and the "
         "final one's, and the previous checkpoint's; cosine to the final update. Values near 1: "
         "the update's directions have settled.", lambda: P.plot_drift(df)),
        ("heatmap", f"{metric} per layer and step",
         f"{metric} of every layer (rows) at every step (columns), per module kind.",
         lambda: P.plot_trajectory_heatmap(df, metric)),
    ]
    return [FigureFile(name, title, caption, _render(plot(), "png"))
            for name, title, caption, plot in specs]


def _page(df: pd.DataFrame, run: str, figs: list[FigureFile], means: pd.DataFrame,
          skipped: list[tuple[str, str]]) -> str:
    from deltaspec import __version__

    steps = sorted(set(df["step"]))
    meta = (f"<p class='meta'>run: <code>{html.escape(run)}</code> · {len(steps)} checkpoints "
            f"(steps {steps[0]}–{steps[-1]}) · {df['module'].nunique()} modules · deltaspec "
            f"{html.escape(__version__)} · table: <a href='{TABLE}'>{TABLE}</a></p>")
    bad = ""
    if skipped:
        items = "".join(f"<li>{html.escape(reason)}</li>" for _, reason in skipped)
        bad = _section("skipped", "Checkpoints left out (--skip-bad)", f"<ul>{items}</ul>")
    toc = [*((f"fig-{f.name}", f.title) for f in figs), ("means", "Means per step and kind")]
    return "\n".join([
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>deltaspec trajectory</title><style>{STYLE}</style></head><body><main>",
        "<h1>Spectral trajectory over training</h1>", meta, _toc(toc), bad,
        _section("figures", "Figures", *(_figure(f) for f in figs)),
        _section("means", "Means per step and module kind", table_html(means, max_rows=200)),
        "</main></body></html>\n"])


def write_page(df: pd.DataFrame, out_dir: str | Path, *, run: str = "",
               metric: str = "normalized_entropy",
               skipped: list[tuple[str, str]] | None = None) -> Path:
    """Write ``index.html``, the figures' PNGs, ``trajectory.csv``, ``means.csv`` and
    ``summary.json`` into ``out_dir`` (all or nothing); returns ``index.html``."""
    target = check_out_dir(out_dir)
    figs = figures(df, metric)
    means = step_means(df)
    page = _page(df, run, figs, means, skipped or [])
    summary = {"generator": GENERATOR, "page": "trajectory", "run": run,
               "steps": [int(s) for s in sorted(set(df["step"]))], "k": df.attrs.get("k"),
               "skipped_checkpoints": [list(s) for s in skipped or []],
               "figures": [f"{f.name}.png" for f in figs], "tables": [TABLE, "means.csv"]}
    with atomic_dir(target) as tmp:
        for f in figs:
            (tmp / f"{f.name}.png").write_bytes(f.png)
        df.to_csv(tmp / TABLE, index=False)
        means.to_csv(tmp / "means.csv", index=False)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return target / "index.html"


__all__ = ["figures", "step_means", "write_page"]
