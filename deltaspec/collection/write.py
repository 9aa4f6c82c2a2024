"""Writing a collection's folder: tidy CSV tables, ``zoo.json`` (the headline numbers), the figures
as PNG and a self-contained ``index.html`` (the report's page helpers) — into a temporary folder
renamed into place at the end, so a failure leaves nothing half-written."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from deltaspec.collection import ZooResult
from deltaspec.errors import UsageError
from deltaspec.output import to_records
from deltaspec.report.html import STYLE, FigureFile, _figure, _section, _toc, table_html
from deltaspec.report.write import _render, atomic_dir, check_out_dir

GENERATOR = "deltaspec zoo"
TABLES = ("pairs", "matrix", "clusters", "basis", "modules")
SHOWN_MODULES = 20
SHOWN_PAIRS = 10


def check_zoo_dir(out_dir: str | Path) -> Path:
    """The output folder, checked before any work: an earlier zoo folder there is replaced; any
    other non-empty folder is refused (:func:`deltaspec.report.write.check_out_dir`)."""
    target = Path(out_dir).expanduser().absolute()
    try:
        earlier = json.loads((target / "zoo.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        earlier = False
    if earlier:
        return target
    return check_out_dir(out_dir)


def basis_summary(res: ZooResult) -> pd.DataFrame:
    """Per module kind and side: the median over layers of the d keeping 90 % / 99 % of the
    energy with one shared basis, beside the directions the updates hold in all."""
    rows = []
    for kind, part in res.modules.groupby("kind", observed=True, sort=True):
        for side in ("left", "right"):
            rows.append({"kind": str(kind), "side": side, "modules": len(part),
                         "directions": int(part[f"basis_dim_{side}"].median()),
                         "d90": float(part[f"basis_d90_{side}"].median()),
                         "d99": float(part[f"basis_d99_{side}"].median())})
    return pd.DataFrame(rows)


def closest_pairs(res: ZooResult, n: int = SHOWN_PAIRS) -> pd.DataFrame:
    """The n most similar pairs of updates by whole-model |cosine|."""
    m = res.matrix[res.matrix["a"] < res.matrix["b"]].copy()
    m["abs"] = m["cosine"].abs()
    return m.sort_values("abs", ascending=False).drop(columns="abs").head(n).reset_index(drop=True)


def summary(res: ZooResult, base: str | None) -> dict[str, Any]:
    """The headline numbers (``zoo.json``)."""
    from deltaspec import __version__

    return {"generator": GENERATOR, "version": __version__, "base": base, "updates": res.sources,
            "k": res.k, "modules": int(res.modules.shape[0]),
            "groups": res.tree.groups, "group_criterion": res.tree.criterion,
            "clusters": to_records(res.clusters),
            "chance_phi": "E[φ(K, K)] = K/m for random K-dimensional subspaces of ℝᵐ "
                          "(chance_left: m = rows, chance_right: m = columns)",
            "shared_basis": to_records(basis_summary(res)),
            "closest_pairs": to_records(closest_pairs(res)),
            "most_varying_modules": to_records(res.modules.sort_values("spread", ascending=False)
                                               .head(SHOWN_MODULES)[["module", "spread", "norm_cv"]]),
            "notes": res.notes, "tables": [f"{t}.csv" for t in TABLES],
            "figures": ["heatmap.png", "dendrogram.png", "shared_basis.png"]}


def figures(res: ZooResult) -> list[FigureFile]:
    """The page's figures, rendered to PNG bytes."""
    from deltaspec.plots.collection import plot_dendrogram, plot_shared_basis, plot_zoo_heatmap

    chance = float(res.pairs["chance_left"].mean()) if len(res.pairs) else float("nan")
    specs = [
        ("heatmap", "Similarity of the updates", "Whole-model cosine ⟨ΔWₐ, ΔW_b⟩/(‖ΔWₐ‖‖ΔW_b‖) of "
         "the concatenated updates, exact and gauge invariant, in the dendrogram's order: groups "
         "are blocks on the diagonal. 0: unrelated directions; ±1: the same update up to scale.",
         plot_zoo_heatmap(res)),
        ("dendrogram", "Clusters", res.tree.criterion[0].upper() + res.tree.criterion[1:] + ".",
         plot_dendrogram(res)),
        ("shared_basis", "Shared basis", "Energy Σₐ‖P_d ΔWₐ‖² / Σₐ‖ΔWₐ‖² kept when every update "
         "is projected on the top-d directions of the whole collection (exact, from the stacked "
         "factors), per module kind: median across layers, band 10–90 %. A curve that reaches "
         "0.99 early means one small basis could serve every update. Mean chance level of "
         f"φ(K, K) for random subspaces in this collection: {chance:.3g}.",
         plot_shared_basis(res)),
    ]
    return [FigureFile(name, title, caption, _render(fig, "png")) for name, title, caption, fig in specs]


def page(res: ZooResult, figs: list[FigureFile], base: str | None, title: str) -> str:
    """The self-contained page: what was compared, the headline, figures, then the tables."""
    from deltaspec import __version__

    updates = pd.DataFrame({"label": res.labels, "checkpoint": [res.sources[lb] for lb in res.labels]})
    glance = (f"<p>{len(res.labels)} updates, {res.modules.shape[0]} modules compared, K = {res.k}. "
              f"<b>{res.tree.groups} suggested group{'s' if res.tree.groups != 1 else ''}</b> "
              f"({html.escape(res.tree.criterion)}).</p>"
              + "".join(f"<p class='meta'>{html.escape(n)}</p>" for n in res.notes))
    spread = res.modules.sort_values("spread", ascending=False).head(SHOWN_MODULES)
    fig = {f.name: _figure(f) for f in figs}
    chance = res.pairs[["chance_left", "chance_right"]].mean()
    sections = [
        ("glance", "At a glance", glance + fig["heatmap"] + fig["dendrogram"]),
        ("pairs", "Closest pairs (whole-model cosine; φ: mean over modules)",
         table_html(closest_pairs(res)) + f"<p class='meta'>φ of random subspaces of the same size "
         f"(chance): {chance['chance_left']:.3g} left, {chance['chance_right']:.3g} right "
         "(mean K/m over the pairs and modules).</p>"),
        ("basis", "Shared basis per module kind (median over layers)",
         table_html(basis_summary(res)) + fig["shared_basis"]),
        ("spread", "Modules that vary most across the collection", table_html(spread)),
        ("clusters", "Groups", table_html(res.clusters, max_rows=200)),
        ("updates", "Updates", table_html(updates, max_rows=200)),
    ]
    links = " · ".join(f"<a href='{t}.csv'>{t}.csv</a>" for t in TABLES)
    parts = ["<!doctype html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>base: <code>{html.escape(base or '(none given)')}</code> · deltaspec "
             f"{html.escape(__version__)} · tables: {links} · <a href='zoo.json'>zoo.json</a></p>",
             _toc([(a, h) for a, h, _ in sections]),
             *(_section(a, h, body) for a, h, body in sections),
             "</main></body></html>\n"]
    return "\n".join(parts)


def write(res: ZooResult, out_dir: str | Path, *, base: str | None = None,
          title: str | None = None) -> Path:
    """Write the collection's folder; returns its ``index.html``."""
    target = check_zoo_dir(out_dir)
    figs = figures(res)
    doc = json.dumps(summary(res, base), indent=2, ensure_ascii=False, default=str) + "\n"
    text = page(res, figs, base, title or f"Collection of {len(res.labels)} updates")
    with atomic_dir(target) as tmp:
        for name in TABLES:
            frame = getattr(res, name)
            if not isinstance(frame, pd.DataFrame):
                raise UsageError(f"table {name}: not a DataFrame")
            frame.to_csv(tmp / f"{name}.csv", index=False)
        for f in figs:
            (tmp / f"{f.name}.png").write_bytes(f.png)
        (tmp / "zoo.json").write_text(doc, encoding="utf-8")
        (tmp / "index.html").write_text(text, encoding="utf-8")
    return target / "index.html"


__all__ = ["GENERATOR", "basis_summary", "check_zoo_dir", "closest_pairs", "figures", "page",
           "summary", "write"]
