"""``index.html`` of the democracy report: one self-contained page (figures embedded as data URIs,
no script, no external resource), with links to the PNG/SVG and CSV files written beside it."""

from __future__ import annotations

import base64
import html
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from deltaspec.output import fmt_number

STYLE = """
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d232b;margin:0;
background:#f6f7f9}
main{max-width:1360px;margin:0 auto;padding:14px 20px 48px;background:#fff}
h1{font-size:21px;margin:0 0 2px}h2{font-size:17px;margin:22px 0 6px;border-bottom:1px solid #dde1e6}
.meta{color:#5a6470;font-size:12px;margin:2px 0}
nav.toc{font-size:13px;margin:6px 0 8px;padding:4px 8px;background:#f2f4f7;border-radius:4px}
nav.toc a{margin-right:12px;white-space:nowrap}
.verdict{padding:8px 14px;border-left:5px solid #888;background:#f2f4f7}
.verdict.holds{border-color:#2e8540;background:#eef7f0}.verdict.fails,.verdict.reversed{
border-color:#c0392b;background:#fbefed}.verdict.inconclusive{border-color:#c98a00;background:#fdf6e3}
.verdict .status{font-size:16px;font-weight:600;margin:0 0 4px}.verdict .text{font-size:12.5px;
color:#3d4650;margin:4px 0 0}
.scroll{overflow-x:auto;max-width:100%}
table.tbl{border-collapse:collapse;font-size:12.5px;margin:4px 0}
table.tbl th,table.tbl td{padding:3px 8px;border-bottom:1px solid #e3e6ea;text-align:right}
table.tbl th{background:#f2f4f7;white-space:normal;max-width:9em;vertical-align:bottom}
table.tbl td:first-child,table.tbl th:first-child{text-align:left}
figure{margin:18px 0}figure img{max-width:100%;height:auto;border:1px solid #e3e6ea}
figcaption{font-size:13px;color:#3d4650;max-width:1100px}
code{font-size:12px;background:#f2f4f7;padding:1px 4px;border-radius:3px}
.reftoggle{font-size:13px;margin:4px 0}img.no-ref{display:none}
#show-ref:not(:checked)~section img.with-ref{display:none}
#show-ref:not(:checked)~section img.no-ref{display:inline}
"""


# Page headers of the report's columns (the CSV files keep the column names).
HEADERS = {
    "normalized_entropy_topk": "norm. entropy (top K)", "normalized_entropy_topk_std": "± sd",
    "normalized_entropy": "norm. entropy (all)", "normalized_entropy_std": "± sd (all)",
    "effective_rank_topk": "eff. rank (top K)", "effective_rank": "eff. rank (all)",
    "stable_rank": "stable rank", "top1_share": "top-1 energy",
    "trainable_params": "trainable params", "heldout_accuracy": "held-out accuracy",
    "acc_transform": "acc. transform", "acc_classify": "acc. classify", "acc_recall": "acc. recall",
    "final_loss": "final loss", "tokens_per_s": "throughput", "peak_memory_mb": "peak memory",
    "wall_time_s": "wall time",
}


def human_count(v: float) -> str:
    """A count for people: 157696 → '157.7 k', 1.25e6 → '1.2 M', small counts as they are.

    >>> human_count(157696), human_count(824448), human_count(1_250_000), human_count(980)
    ('157.7 k', '824.4 k', '1.2 M', '980')
    """
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.1f} {unit}"
    return f"{v:.0f}"


# Column → formatter for people; every other number: 4 significant digits.
FORMATS: dict[str, Any] = {
    "trainable_params": human_count,
    "tokens_per_s": lambda v: f"{human_count(v)} tokens/s",
    "peak_memory_mb": lambda v: f"{v:.1f} MiB",
    "wall_time_s": lambda v: f"{v:.0f} s",
    "heldout_accuracy": lambda v: f"{v:.3f}",
    "final_loss": lambda v: f"{v:.3f}",
}


@dataclass(frozen=True)
class FigureFile:
    """A rendered figure: its file stem, title, caption and PNG bytes (SVG bytes if written;
    ``png_plain``: the same figure without the reference overlay, when it has one)."""

    name: str
    title: str
    caption: str
    png: bytes
    svg: bytes | None = None
    png_plain: bytes | None = None


def _fmt(v: Any, column: str = "") -> str:
    """A cell for people: :data:`FORMATS` by column, else the package's number format."""
    if column in FORMATS and isinstance(v, numbers.Real) and not isinstance(v, bool) \
            and v == v:  # NaN falls through to fmt_number's dash
        return str(FORMATS[column](float(v)))
    return fmt_number(v)


def table_html(df: pd.DataFrame, max_rows: int = 60) -> str:
    """A DataFrame as an HTML table: page headers (:data:`HEADERS`), numbers for people
    (:data:`FORMATS`, else 4 significant digits), at most ``max_rows`` rows."""
    shown = df.head(max_rows)
    cols = [str(c) for c in shown.columns]
    head = "".join(f"<th title='{html.escape(c)}'>{html.escape(HEADERS.get(c, c))}</th>"
                   for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v, c))}</td>"
                                    for v, c in zip(row, cols, strict=True)) + "</tr>"
                   for row in shown.itertuples(index=False))
    more = (f"<p class='meta'>first {max_rows} of {len(df)} rows; all of them in the CSV.</p>"
            if len(df) > max_rows else "")
    return (f"<div class='scroll'><table class='tbl'><thead><tr>{head}</tr></thead><tbody>{body}"
            f"</tbody></table></div>{more}")


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(f: FigureFile) -> str:
    links = f"<a href='{f.name}.png'>PNG</a>" + (f" · <a href='{f.name}.svg'>SVG</a>" if f.svg else "")
    alt = html.escape(f.title)
    if f.png_plain is None:
        img = f"<img src='{_uri(f.png)}' alt='{alt}'>"
    else:  # both, the checkbox at the top of the page shows one of them (no script)
        img = (f"<img class='with-ref' src='{_uri(f.png)}' alt='{alt}'>"
               f"<img class='no-ref' src='{_uri(f.png_plain)}' alt='{alt} (no reference)'>")
    return (f"<figure id='fig-{f.name}'>{img}<figcaption><b>{html.escape(f.title)}.</b> "
            f"{html.escape(f.caption)} ({links})</figcaption></figure>")


def _inputs(paths: dict[str, str], methods: dict[str, str], modules: dict[str, int],
            only_in: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame([{"label": lb, "checkpoint": p, "method": methods.get(lb, ""),
                          "modules compared": modules.get(lb, 0),
                          "modules not compared": len(only_in.get(lb, []))}
                         for lb, p in paths.items()])


def _ci(p: dict[str, Any]) -> str:
    lo, hi = p.get("ci_low", float("nan")), p.get("ci_high", float("nan"))
    return "—" if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]"


def _pairs_table(verdict: dict[str, Any]) -> str:
    pairs = verdict.get("pairs") or []
    if not pairs:
        return ""
    level = f"{verdict.get('level', 0.95):.0%}"
    rows = [{"pair": f"{p['b']} − {p['a']}", "difference": f"{p['diff']:+.4f}",
             f"{level} interval": _ci(p), "interval over": p.get("unit", ""),
             "runs": " / ".join(map(str, p["n_runs"])),
             "p (Holm)": f"{p['p_holm']:.3g}" if "p_holm" in p else "—",
             "verdict": p["verdict"] or "none: one run per method"} for p in pairs]
    nulls = [{"pair": f"{n['b']} − {n['a']}", "with": n["what"], "difference": f"{n['diff']:+.4f}",
              f"{level} interval": _ci(n), "observed": f"{n['observed']:+.4f}"}
             for n in verdict.get("nulls") or []]
    null_html = ("<p class='meta'>Beside the nulls (each pair with one side replaced by its null; "
                 "descriptive, not in the Holm family):</p>" + table_html(pd.DataFrame(nulls))
                 if nulls else "")
    return table_html(pd.DataFrame(rows)) + null_html


def _verdict_box(verdict: dict[str, Any]) -> str:
    from deltaspec.report.verdict_text import headline

    status = verdict.get("status")
    state = {"holds": "holds", "reversed": "reversed", "inconclusive": "inconclusive"}.get(
        status or "", "none")
    if status is None:
        return f"<div class='verdict {state}'><p class='text'>{html.escape(verdict['text'])}</p></div>"
    metric = (f"{verdict.get('metric_title', verdict.get('metric'))}, r = {verdict.get('top_k')}; "
              + ("Welch's t over seed-level means, Holm over the pairs" if state != "none" else
                 "bootstrap over modules (no seed variation)"))
    return (f"<div class='verdict {state}'><p class='status'>{html.escape(headline(verdict))}</p>"
            f"<p class='meta'>{html.escape(metric)}</p>"
            f"{_pairs_table(verdict)}<p class='text'>{html.escape(verdict['text'])}</p></div>")


def _toc(entries: Sequence[tuple[str, str]]) -> str:
    links = " ".join(f"<a href='#{html.escape(a)}'>{html.escape(t)}</a>" for a, t in entries)
    return f"<nav class='toc'><b>Contents:</b> {links}</nav>"


def _section(anchor: str, heading: str, *content: str) -> str:
    return (f"<section id='{html.escape(anchor)}'><h2>{html.escape(heading)}</h2>"
            + "".join(content) + "</section>")


def render(*, title: str, base: str | None, paths: dict[str, str], methods: dict[str, str],
           modules: dict[str, int], only_in: dict[str, list[str]], verdict: dict[str, Any],
           summary: pd.DataFrame, figures: Sequence[FigureFile],
           tables: Sequence[tuple[str, str, pd.DataFrame]], csv_files: Sequence[str],
           version: str, first: Sequence[tuple[str, str, pd.DataFrame]] = ()) -> str:
    """The whole page. ``first``: (heading, CSV file name, frame) shown right under the verdict
    (e.g. the training table); ``tables``: the same, shown below the figures; ``csv_files``: every
    CSV written beside the page (linked at the top). Paths are shown as given (the caller makes
    them relative to the report)."""
    csv_links = " · ".join(f"<a href='{html.escape(fn)}'>{html.escape(fn)}</a>" for fn in csv_files)
    front = [(f"tbl-{i}", h, fn, fr) for i, (h, fn, fr) in enumerate(first)]
    back = [(f"tbl-{len(first) + i}", h, fn, fr) for i, (h, fn, fr) in enumerate(tables)]
    toc = [("verdict", "Verdict"), *((a, h) for a, h, _, _ in front), ("updates", "Updates"),
           ("summary", "Summary"), *((f"fig-{f.name}", f.title) for f in figures),
           *((a, h) for a, h, _, _ in back)]

    def table_section(anchor: str, heading: str, filename: str, frame: pd.DataFrame) -> str:
        link = f"<p class='meta'><a href='{html.escape(filename)}'>{html.escape(filename)}</a></p>"
        return _section(anchor, heading, table_html(frame), link)

    toggle = ""
    if any(f.png_plain is not None for f in figures):
        toggle = ("<input type='checkbox' id='show-ref' checked><label class='reftoggle' "
                  "for='show-ref'> draw the reference curves (thin, dashed, behind yours)</label>")
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>base: <code>{html.escape(base or '(none given)')}</code> · "
        f"deltaspec {html.escape(version)} · tables: {csv_links} · "
        "<a href='summary.json'>summary.json</a></p>", _toc(toc),
        _section("verdict", "Verdict", _verdict_box(verdict)),
        *(table_section(*t) for t in front),
        _section("updates", "Updates", table_html(_inputs(paths, methods, modules, only_in))),
        _section("summary", "Summary (means over modules)", table_html(summary)),
        toggle, _section("figures", "Figures", *[_figure(f) for f in figures]),
        *(table_section(*t) for t in back),
        "</main></body></html>\n",
    ]
    return "\n".join(p for p in parts if p)
