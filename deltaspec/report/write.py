"""Writing the democracy report folder: figures (PNG, optionally SVG), CSV tables, summary.json and
a self-contained index.html — all into a temporary folder beside the target, renamed into place at
the end, so that a failure leaves no half-written report."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from deltaspec.atomic import tmp_name
from deltaspec.errors import UsageError
from deltaspec.output import to_records
from deltaspec.report.data import ReportData, collect
from deltaspec.report.html import FigureFile, render
from deltaspec.report.verdict import expected_order, summary_table, verdict

GENERATOR = "deltaspec report"
DPI = 110
BUILTIN_TABLES = ("summary", "metrics", "spectra", "similarity", "nulls")
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")

Plot = Callable[[ReportData, pd.DataFrame, Mapping[str, Any]], Any]
# Extra tables shown on the first screen, under the verdict (the rest follow the figures).
_FIRST = ("training",)
_TITLES = {"training": "Training: held-out accuracy, throughput and memory per method"}


def _figure_specs(data: ReportData) -> list[tuple[str, str, str, Plot]]:
    """(file stem, title, caption, plot) of every figure the report draws for ``data``."""
    from deltaspec import plots as P

    k, kk = data.k, data.top_k
    specs: list[tuple[str, str, str, Plot]] = [
        ("entropy_summary", "Mean normalised entropy per update",
         f"Mean over modules of the normalised singular-value entropy H/ln k, over the top K={kk} "
         "values (one K for all updates, so ranks are comparable) and over all values; error bars: "
         "standard deviation across modules. Higher means a more democratic update.",
         lambda d, s, r: P.plot_entropy_summary(s, reference=r.get("summary"))),
        ("spectra", "Normalised spectra",
         "σᵢ/σ₁ against i on log axes, one panel per module kind: median across layers, band "
         "10–90 % of layers. A curve that drops fast is dominated by a few directions; a line "
         "that ends early is a low-rank update.",
         lambda d, s, r: P.plot_spectra(d.spectra, reference=r.get("spectra"))),
        ("energy", "Cumulative energy",
         "Share of Σσ² held by the top i directions: how many directions carry the update.",
         lambda d, s, r: P.plot_energy(d.spectra, reference=r.get("spectra"))),
        ("entropy_by_layer", "Normalised entropy per layer",
         f"Normalised entropy over the top K={kk} singular values, per layer and module kind.",
         lambda d, s, r: P.plot_entropy_by_layer(d.metrics, reference=r.get("metrics"))),
        ("effective_rank_by_layer", "Effective rank per layer",
         f"exp(H) over the top K={kk} singular values, the same K as the entropy (Roy & "
         "Vetterli): the number of directions the update effectively uses, at most K.",
         lambda d, s, r: P.plot_entropy_by_layer(d.metrics, metric="effective_rank_topk",
                                                 reference=r.get("metrics"))),
    ]
    if len(data.labels) > 1:
        specs += [
            ("similarity_heatmap", f"Subspace similarity of {data.module}",
             "φ(i, j) = ‖Uₐ[:, :i]ᵀ U_b[:, :j]‖²_F / min(i, j) between the top left singular "
             f"vectors of two updates (Hu et al. 2021, §7), up to K={k}; 1: the subspaces coincide.",
             lambda d, s, r: P.plot_similarity_heatmap(d.grids)),
            ("similarity_by_layer", "Subspace similarity per layer",
             f"φ(K, K) of the left singular vectors, K={k} (less where an update has lower rank), "
             f"for every pair of updates. Grey: φ of random subspaces of the same size — mean "
             f"{_chance_note(data)} (dotted) ± 2 sd (band); a value inside the band is no "
             "evidence of shared directions.",
             lambda d, s, r: P.plot_similarity_by_layer(d.similarity)),
        ]
    from deltaspec.report.training import training_specs  # runs that carry a training log

    specs += training_specs(data.runs or {lb: [p] for lb, p in data.paths.items()})
    return specs


def _chance_note(data: ReportData) -> str:
    sim = data.similarity
    if sim.empty or "chance_left" not in sim:
        return "k/n"
    m, sd = float(sim["chance_left"].mean()), float(sim["chance_left_sd"].mean())
    return f"≈ {m:.3f} (sd {sd:.3f})"


def _render(fig: Any, fmt: str) -> bytes:
    import matplotlib

    buf = io.BytesIO()
    meta = {"Software": None} if fmt == "png" else {"Date": None}
    with matplotlib.rc_context({"svg.hashsalt": "deltaspec"}):
        fig.savefig(buf, format=fmt, dpi=DPI, metadata=meta)
    return buf.getvalue()


def render_figures(data: ReportData, summary: pd.DataFrame, reference: Mapping[str, Any] | None = None,
                   svg: bool = False) -> list[FigureFile]:
    """Draw every figure of the report into memory (PNG bytes, and SVG bytes with ``svg``)."""
    out = []
    for name, title, caption, plot in _figure_specs(data):
        fig = plot(data, summary, reference or {})
        plain = _render(plot(data, summary, {}), "png") if reference and name in _OVERLAID else None
        out.append(FigureFile(name, title, caption, _render(fig, "png"),
                              _render(fig, "svg") if svg else None, plain))
    return out


# The figures that draw a reference overlay (the page can switch it off).
_OVERLAID = {"entropy_summary", "spectra", "energy", "entropy_by_layer", "effective_rank_by_layer"}


def _relative(path: str | None, target: Path) -> str | None:
    """``path`` relative to the report folder (as given when it cannot be: another drive)."""
    if path is None:
        return None
    try:
        return os.path.relpath(Path(path).absolute(), target)
    except ValueError:
        return path


def check_out_dir(out_dir: str | Path) -> Path:
    """Validate the output folder before any work: a creatable path, not a file, and not a
    non-empty folder that holds something other than an earlier report (never overwritten)."""
    if not str(out_dir).strip():
        raise UsageError("--out: the output folder path is empty")
    target = Path(out_dir).expanduser().absolute()
    if target.is_symlink():
        raise UsageError(f"{target}: is a symbolic link; not replacing it nor what it points to "
                         "(give the folder itself, or another --out)")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not _is_report(target):
        raise UsageError(f"{target}: folder is not empty and holds no deltaspec report; "
                         "not overwriting it (choose another --out)")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"{target}: cannot create the output folder ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UsageError(f"{target}: cannot create the output folder ({ancestor} is not writable)")
    return target


def _is_report(folder: Path) -> bool:
    try:
        return json.loads((folder / "summary.json").read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``target``; on success it replaces ``target`` (an earlier report
    is removed only after the new one is in place); on failure nothing is left behind. On a
    rank that does not write (:func:`deltaspec.output.this_rank_writes`) it is a throwaway."""
    from deltaspec.output import this_rank_writes

    if not this_rank_writes():
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch)
        return
    created: list[Path] = []
    tmp = target.parent / tmp_name(target)  # shortened: a 250-character --out still fits
    try:
        for d in reversed([target.parent, *target.parent.parents]):
            if not d.exists():
                d.mkdir()
                created.append(d)
        tmp.mkdir()
        yield tmp
        _swap(tmp, target)
    except OSError as exc:
        _cleanup(tmp, created)
        raise UsageError(f"{target}: cannot write the report ({exc.strerror or exc})") from None
    except BaseException:
        _cleanup(tmp, created)
        raise


def _cleanup(tmp: Path, created: list[Path]) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def _swap(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = target.parent / (tmp_name(target).removesuffix(".tmp") + ".old")
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        os.rename(old, target)
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _check_extra(extra: Mapping[str, pd.DataFrame]) -> None:
    for name, frame in extra.items():
        if not _NAME.match(name) or name in BUILTIN_TABLES:
            raise UsageError(f"extra table {name!r}: use letters, digits, _ and -, and none of "
                             f"{', '.join(BUILTIN_TABLES)}")
        if not isinstance(frame, pd.DataFrame):
            raise UsageError(f"extra table {name!r}: expected a pandas DataFrame")


def _summary_json(data: ReportData, summary: pd.DataFrame, v: dict[str, Any],
                  figures: Sequence[FigureFile], tables: dict[str, pd.DataFrame],
                  extra: Mapping[str, pd.DataFrame]) -> str:
    from deltaspec import __version__

    counts = summary.set_index("label")["modules"]
    doc = {
        "generator": GENERATOR, "version": __version__, "base": data.base, "updates": data.paths,
        "methods": data.methods(), "modules": {str(k): int(n) for k, n in counts.items()},
        "not_compared": data.only_in, "k": data.k, "top_k": data.top_k,
        "heatmap_module": data.module, "summary": to_records(summary), "verdict": v,
        "figures": [f"{f.name}.png" for f in figures] + [f"{f.name}.svg" for f in figures if f.svg],
        "tables": [f"{n}.csv" for n in tables], "extra_tables": {n: to_records(f) for n, f in extra.items()},
    }
    return json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n"


def save_report(data: ReportData, out_dir: str | Path, *, order: Sequence[str] | None = None,
                extra_tables: Mapping[str, pd.DataFrame] | None = None,
                reference: Mapping[str, Any] | None = None, svg: bool = False,
                title: str | None = None) -> Path:
    """Write the report of already collected ``data`` into ``out_dir``; returns ``index.html``.

    ``extra_tables`` (name → DataFrame) are shown on the page and written as ``<name>.csv`` (e.g.
    held-out accuracy, tokens/s and peak memory per method). ``reference`` may hold ``spectra``,
    ``metrics`` and ``summary`` tables (the report's own schemas), drawn dashed over the user's.
    """
    from deltaspec import __version__

    target = check_out_dir(out_dir)
    extra = dict(extra_tables or {})
    _check_extra(extra)
    summary = summary_table(data.metrics)
    summary.attrs["top_k"] = data.top_k
    v = verdict(summary, data.top_k, order, data.metrics, data.nulls)
    figures = render_figures(data, summary, reference, svg)
    tables = {"summary": summary, "metrics": data.metrics, "spectra": data.spectra,
              "similarity": data.similarity, "nulls": data.nulls, **extra}
    first = [(_TITLES.get(n, f"Table: {n}"), f"{n}.csv", extra[n]) for n in extra if n in _FIRST]
    shown = [(f"Table: {n}", f"{n}.csv", extra[n]) for n in extra if n not in _FIRST]
    shown.append(("Mean φ(K, K) per pair and module kind", "similarity.csv", _similarity_means(data)))
    runs = data.runs or {lb: [p] for lb, p in data.paths.items()}
    rel = {lb: ", ".join(str(_relative(p, target)) for p in ps) for lb, ps in runs.items()}
    page = render(
        title=title or f"Democracy report: {', '.join(data.labels)}",
        base=_relative(data.base, target), paths=rel, methods=data.methods(),
        modules={str(k): int(n) for k, n in summary.set_index("label")["modules"].items()},
        only_in=data.only_in, verdict=v, summary=summary, figures=figures, tables=shown,
        csv_files=[f"{n}.csv" for n in tables], version=__version__, first=first)
    with atomic_dir(target) as tmp:
        for f in figures:
            (tmp / f"{f.name}.png").write_bytes(f.png)
            if f.svg:
                (tmp / f"{f.name}.svg").write_bytes(f.svg)
        for name, frame in tables.items():
            frame.to_csv(tmp / f"{name}.csv", index=False)
        (tmp / "summary.json").write_text(_summary_json(data, summary, v, figures, tables, extra))
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return target / "index.html"


def _similarity_means(data: ReportData) -> pd.DataFrame:
    if data.similarity.empty:
        return pd.DataFrame({"note": ["one update only: no pairwise similarity"]})
    return (data.similarity.groupby(["pair", "kind"], observed=True)[["phi_left", "phi_right"]]
            .mean().reset_index())


def write_report(updates: Mapping[str, Any], out_dir: str | Path,
                 base: str | Path | None = None, *, order: Sequence[str] | None = None,
                 extra_tables: Mapping[str, pd.DataFrame] | None = None,
                 reference: Mapping[str, Any] | None = None, svg: bool = False,
                 title: str | None = None, **options: Any) -> Path:
    """Analyse labelled updates of one base and write the democracy report; returns ``index.html``.

    Args:
        updates: label → checkpoint folder, e.g. ``{"lora": ..., "multilora": ..., "full": ...}``.
        out_dir: the report folder (created; an earlier report there is replaced, anything else
            is never overwritten).
        base: the base model folder (needed for full checkpoints).
        order: the expected ascending order of entropy (labels); default: inferred from labels
            containing lora / multilora / full.
        extra_tables, reference, svg, title: see :func:`save_report`.
        **options: :func:`deltaspec.report.collect`'s (top_k, module, options, or any
            :class:`~deltaspec.options.Options` field as a keyword).
    """
    check_out_dir(out_dir)  # fail before the analysis, not after it
    if extra_tables:
        _check_extra(dict(extra_tables))
    if order is not None:
        expected_order([str(x) for x in updates], {}, order)
    data = collect(updates, base, **options)
    return save_report(data, out_dir, order=order, extra_tables=extra_tables, reference=reference,
                       svg=svg, title=title)


__all__ = ["atomic_dir", "check_out_dir", "render_figures", "save_report", "write_report"]
