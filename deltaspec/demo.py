"""The demo chain: pretrain a tiny base (cached), fine-tune LoRA, MultiLoRA and full FT on the
synthetic multi-task mixture, analyse the three updates and write the democracy report with the
training table (held-out accuracy, tokens/s, peak memory) beside the spectral verdict.

Also the shipped reference results: the demo's spectral summary at default settings, stored as
package data (``deltaspec/data/reference_results.json``) so that ``deltaspec report
--with-reference`` can draw a user's curves beside them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from deltaspec.config_files import parse_json_file
from deltaspec.errors import ConfigError, UsageError
from deltaspec.output import write_atomic

METHODS = ("lora", "multilora", "full")
LOG_POINTS = 4  # log-point checkpoints per fine-tune: the report's figure over training
REFERENCE_FILE = "reference_results.json"
REFERENCE_VERSION = 1
# What the shipped reference keeps of each report table (the medians the overlays draw).
_REFERENCE_COLUMNS = {
    "spectra": ("label", "kind", "i", "sigma_norm", "energy"),
    "metrics": ("label", "kind", "layer", "normalized_entropy", "normalized_entropy_topk",
                "effective_rank", "effective_rank_topk"),
    "summary": None,  # every column
}


def default_cache_dir() -> Path:
    """Where the pretrained base is cached: $DELTASPEC_CACHE or ~/.cache/deltaspec."""
    env = os.environ.get("DELTASPEC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deltaspec"


def training_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per method: trainable parameters, held-out accuracy (mean and per task family),
    tokens/s, peak memory and wall time, from the reference trainer's metrics."""
    rows = []
    for method in METHODS:
        m = results.get(method)
        if m is None:
            continue
        row = {"method": method, "trainable_params": m["trainable_params"],
               "heldout_accuracy": m["accuracy_mean"]}
        row |= {f"acc_{fam}": v for fam, v in m["accuracy_by_family"].items()}
        row |= {"final_loss": m["loss"]["final"], "tokens_per_s": m["tokens_per_s"],
                "peak_memory_mb": m["peak_memory_mb"], "wall_time_s": m["wall_time_s"]}
        rows.append(row)
    df = pd.DataFrame(rows)
    base_acc = results.get("lora", {}).get("base_accuracy")
    if isinstance(base_acc, dict) and base_acc:
        base_row = {"method": "base (no fine-tune)",
                    "heldout_accuracy": sum(base_acc.values()) / len(base_acc)}
        df = pd.concat([pd.DataFrame([base_row]), df], ignore_index=True)
    return df


def run_demo(out_dir: str | Path, *, quick: bool = False, seed: int = 0,
             cache_dir: str | Path | None = None, device: str = "cpu", threads: int | None = None,
             log: Callable[[str], None] | None = None, with_reference: bool = True) -> Path:
    """Train the three methods into ``out_dir/checkpoints`` and write ``out_dir/report``.

    Returns the report's ``index.html``. The report folder is checked before any training, so a
    bad ``out_dir`` fails at once. The shipped reference curves are drawn only beside a run at
    the settings they were made with (default, seed 0): a ``quick`` run gets none.
    """
    from deltaspec.reference import run_all
    from deltaspec.report import write_report
    from deltaspec.report.write import check_out_dir

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    check_out_dir(out / "report")
    ckpt = out / "checkpoints"
    results = run_all(ckpt, quick=quick, seed=seed, methods=METHODS, device=device,
                      threads=threads, log=log, log_points=LOG_POINTS,
                      cache_dir=cache_dir if cache_dir is not None else default_cache_dir())
    _training_logs(ckpt)
    table = training_table(results)
    write_atomic(out / "training.json", json.dumps(_jsonable(results), indent=2) + "\n")
    reference = _matching_reference(quick, seed, with_reference, log)
    if log:
        log("analysing the three updates (SVD of every module; a progress bar per update) "
            "and writing the report")
    return write_report({m: ckpt / m for m in METHODS}, out / "report", base=ckpt / "base",
                        extra_tables={"training": table}, reference=reference,
                        title="deltaspec demo: LoRA vs MultiLoRA vs full fine-tuning",
                        progress=log is not None)


def _training_logs(ckpt: Path) -> None:
    """Each method's ``trajectory.csv`` (its log points, over the top n·r values of the default
    adapters): the report's "normalised entropy over training" figure."""
    from deltaspec.reference import AdapterConfig
    from deltaspec.reference.train import TRAJECTORY
    from deltaspec.trajectory import write_log

    adapter = AdapterConfig()
    for method in METHODS:
        write_log(ckpt / method, ckpt / method / TRAJECTORY, ckpt / "base",
                  top_k=adapter.n * adapter.r)


def _matching_reference(quick: bool, seed: int, wanted: bool,
                        log: Callable[[str], None] | None) -> dict[str, pd.DataFrame] | None:
    """The shipped reference when it was made with these settings, else None (and say why)."""
    if not wanted:
        return None
    if quick or seed != 0:
        if log:
            log("no reference overlay: the shipped reference was made at the default settings "
                "(seed 0), not with " + ("--quick" if quick else f"--seed {seed}"))
        return None
    return load_reference_results()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def reference_from_report(report_dir: str | Path) -> dict[str, Any]:
    """The compact reference results (version, settings, tables) from a written demo report."""
    folder = Path(report_dir)
    tables = {}
    for name, keep in _REFERENCE_COLUMNS.items():
        df = pd.read_csv(folder / f"{name}.csv")
        df = df[list(keep)] if keep else df
        tables[name] = {"columns": list(df.columns),
                        "data": df.round(6).astype(object).where(df.notna(), None).values.tolist()}
    summary = json.loads((folder / "summary.json").read_text())
    verdict = {k: v for k, v in (summary.get("verdict") or {}).items() if k != "text"}
    training = (summary.get("extra_tables") or {}).get("training") or []
    return {"format": "deltaspec-reference-results", "version": REFERENCE_VERSION,
            "made_with": _made_with(folder.parent / "training.json"), "verdict": verdict,
            "training": training, "tables": tables}


def _made_with(training_json: Path) -> dict[str, Any]:
    """The command's settings and the machine of a demo run (what its speed depends on)."""
    from deltaspec.machine import cpu_model

    runs = json.loads(training_json.read_text()) if training_json.is_file() else {}
    env: dict[str, Any] = next((m.get("environment") for m in runs.values()
                                if m.get("environment")), {})
    seed = next((m.get("config", {}).get("train", {}).get("seed") for m in runs.values()
                 if m.get("config")), None)
    return {"command": "deltaspec demo --out DIR", "seed": seed, "threads": env.get("threads"),
            "device": env.get("device"), "cpu": f"{cpu_model()} ({os.cpu_count()} cores)",
            "torch": env.get("torch")}


def readme_table(reference: dict[str, Any]) -> str:
    """The README's demo table (Markdown) from reference results: per method, trainable
    parameters, held-out accuracy, tokens/s, peak memory and the top-K normalised entropy."""
    names = {"lora": "LoRA", "multilora": "MultiLoRA", "full": "full FT"}
    k = reference["verdict"].get("top_k", 16)
    lines = [f"| method | trainable params | held-out accuracy | tokens/s | peak memory | "
             f"top-{k} normalised entropy |", "|---|---|---|---|---|---|"]
    for row in reference["training"]:
        if row["method"] not in names:
            continue
        lines.append(f"| {names[row['method']]} | {row['trainable_params']:,.0f} | "
                     f"{row['heldout_accuracy']:.3f} | {row['tokens_per_s'] / 1e3:.1f} k | "
                     f"{row['peak_memory_mb']:.1f} MiB | "
                     f"{reference['verdict']['values'][row['method']]:.3f} |")
    return "\n".join(lines) + "\n"


def load_reference_results(path: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """The shipped reference results (or those at ``path``) as the report's overlay tables."""
    if path is None:
        where = f"deltaspec/data/{REFERENCE_FILE}"
        data = json.loads(resources.files("deltaspec").joinpath("data").joinpath(REFERENCE_FILE)
                          .read_text())
    else:
        where, data = str(path), parse_json_file(Path(path), "reference results")
    if data.get("format") != "deltaspec-reference-results" or data.get("version") != REFERENCE_VERSION:
        raise ConfigError(f"{where}: not reference results of version {REFERENCE_VERSION}")
    out = {}
    try:
        for name, tab in data["tables"].items():
            df = pd.DataFrame(tab["data"], columns=tab["columns"])
            for col in ("label", "kind"):
                if col in df:
                    df[col] = pd.Categorical(df[col], categories=list(dict.fromkeys(df[col])))
            out[name] = df
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{where}: malformed reference results ({type(exc).__name__}: "
                          f"{str(exc)[:100]})") from None
    return out


def write_reference_results(report_dir: str | Path, target: str | Path) -> Path:
    """Store a demo report's spectral summary as reference results (how the package data is made)."""
    write_atomic(target, json.dumps(reference_from_report(report_dir), indent=1) + "\n")
    return Path(target)
