"""The demo chain: pretrain a tiny base (cached), fine-tune LoRA, MultiLoRA and full FT on the
synthetic multi-task mixture with several seeds, analyse the updates and write the democracy report
with the training table (held-out accuracy, tokens/s, peak memory; means over seeds) beside the
spectral verdict — a verdict over seeds (the unit of a method claim), which one run per method
cannot give.

The demo's model is the reference's small preset (64 wide, 2 blocks: :func:`demo_configs`) so that
:data:`DEFAULT_SEEDS` seeds of three methods fit in a few minutes on 2 CPU cores; the base is
pretrained once (seed ``seed``) and every seed ``seed, seed + 1, …`` fine-tunes it.

Also the shipped reference results: the demo's spectral summary at default settings, stored as
package data (``deltaspec/data/reference_results.json``) so that ``deltaspec report
--with-reference`` can draw a user's curves beside them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaspec.config_files import parse_json_file
from deltaspec.errors import ConfigError, UsageError
from deltaspec.output import write_atomic

if TYPE_CHECKING:  # pandas is imported where it is used: `deltaspec demo --help` stays fast
    import pandas as pd

METHODS = ("lora", "multilora", "full")
LOG_POINTS = 4  # log-point checkpoints per fine-tune: the report's figure over training
DEFAULT_SEEDS = 3
DEMO_STEPS = 300  # fine-tuning steps of every method (the tuned rates; --quick: the quick preset)
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


def _row(method: str, m: dict[str, Any]) -> dict[str, Any]:
    row = {"method": method, "trainable_params": m["trainable_params"],
           "heldout_accuracy": m["accuracy_mean"]}
    row |= {f"acc_{fam}": v for fam, v in m["accuracy_by_family"].items()}
    return row | {"final_loss": m["loss"]["final"], "tokens_per_s": m["tokens_per_s"],
                  "peak_memory_mb": m["peak_memory_mb"], "wall_time_s": m["wall_time_s"]}


def training_table(results: dict[str, Any]) -> pd.DataFrame:
    """One row per method: trainable parameters, held-out accuracy (mean and per task family),
    tokens/s, peak memory and wall time, from the reference trainer's metrics. ``results[method]``
    is one run's metrics or a list of runs (seeds): then the means over them, with ``seeds`` and
    ``heldout_accuracy_sd`` (the seed-to-seed standard deviation)."""
    import pandas as pd

    rows = []
    for method in METHODS:
        m = results.get(method)
        if m is None:
            continue
        runs = [_row(method, r) for r in (m if isinstance(m, list) else [m])]
        frame = pd.DataFrame(runs)
        row = {"method": method, **frame.drop(columns="method").mean().to_dict(),
               "seeds": len(runs)}
        row["heldout_accuracy_sd"] = frame["heldout_accuracy"].std() if len(runs) > 1 else None
        rows.append(row)
    df = pd.DataFrame(rows)
    first = results.get("lora")
    base_acc = (first[0] if isinstance(first, list) else first or {}).get("base_accuracy")
    if isinstance(base_acc, dict) and base_acc:
        base_row = {"method": "base (no fine-tune)",
                    "heldout_accuracy": sum(base_acc.values()) / len(base_acc)}
        df = pd.concat([pd.DataFrame([base_row]), df], ignore_index=True)
    return df


def demo_configs(quick: bool, seed: int) -> dict[str, Any]:
    """run_all's settings of the demo: the small model; the quick preset with ``quick``."""
    from deltaspec.reference import default_train_config, quick_model_config
    from deltaspec.reference.configs import TrainConfig

    if quick:
        return {"quick": True}

    def tuned(method: str) -> TrainConfig:
        d = default_train_config(method, False, seed)
        return dataclasses.replace(d, steps=DEMO_STEPS, warmup_steps=DEMO_STEPS // 10)

    return {"model_config": quick_model_config(), "finetune_configs": {m: tuned(m) for m in METHODS}}


def _train(ckpt: Path, quick: bool, seed: int, seeds: int, device: str, threads: int | None,
           log: Callable[[str], None] | None, cache_dir: str | Path) -> dict[str, Any]:
    """Seed ``seed``: the base and every method (run_all); further seeds fine-tune the same base
    into ``ckpt/<method>-s<seed>``. Returns {"base": …, method: [metrics per seed]}."""
    from deltaspec.reference import finetune, run_all
    from deltaspec.reference.train import base_data_config

    first = run_all(ckpt, seed=seed, methods=METHODS, device=device, threads=threads, log=log,
                    cache_dir=cache_dir, log_points=LOG_POINTS, **demo_configs(quick, seed))
    out: dict[str, Any] = {"base": first["base"], **{m: [first[m]] for m in METHODS}}
    for s in range(seed + 1, seed + seeds):
        tuned = demo_configs(quick, s).get("finetune_configs", {})
        for method in METHODS:
            if log:
                log(f"seed {s}: {method}")
            out[method].append(finetune(method, ckpt / "base", ckpt / f"{method}-s{s}", None,
                                        tuned.get(method), base_data_config(ckpt / "base"),
                                        quick=quick, seed=s, device=device, threads=threads))
    return out


def run_demo(out_dir: str | Path, *, quick: bool = False, seed: int = 0, seeds: int = DEFAULT_SEEDS,
             cache_dir: str | Path | None = None, device: str = "cpu", threads: int | None = None,
             log: Callable[[str], None] | None = None, with_reference: bool = True,
             progress: bool = False) -> Path:
    """Train the three methods with ``seeds`` seeds into ``out_dir/checkpoints`` and write
    ``out_dir/report``.

    Returns the report's ``index.html``. The report folder is checked before any training, so a
    bad ``out_dir`` fails at once. ``progress``: progress bars during the analysis (the CLI asks
    for them only when stderr is a terminal and -q is not given). The shipped reference curves
    are drawn only beside a run at the settings they were made with; a ``quick`` run gets none.
    """
    from deltaspec.report import write_report
    from deltaspec.report.write import check_out_dir

    if seeds < 1:
        raise UsageError(f"--seeds must be >= 1 (got {seeds})")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    check_out_dir(out / "report")
    ckpt = out / "checkpoints"
    results = _train(ckpt, quick, seed, seeds, device, threads, log,
                     cache_dir if cache_dir is not None else default_cache_dir())
    _training_logs(ckpt)
    table = training_table(results)
    write_atomic(out / "training.json", json.dumps(_jsonable(results), indent=2) + "\n")
    reference = _matching_reference(quick, seed, seeds, with_reference, log)
    if log:
        log(f"analysing {3 * seeds} updates and writing the report")
    runs = {m: [ckpt / m, *(ckpt / f"{m}-s{s}" for s in range(seed + 1, seed + seeds))]
            for m in METHODS}
    return write_report(runs, out / "report", base=ckpt / "base",
                        extra_tables={"training": table}, reference=reference,
                        title="deltaspec demo: LoRA vs MultiLoRA vs full fine-tuning",
                        progress=progress)


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


def _matching_reference(quick: bool, seed: int, seeds: int, wanted: bool,
                        log: Callable[[str], None] | None) -> dict[str, pd.DataFrame] | None:
    """The shipped reference when it was made with these settings, else None (and say why)."""
    if not wanted:
        return None
    if quick or seed != 0 or seeds != DEFAULT_SEEDS:
        if log:
            log(f"no reference overlay: the shipped reference was made at the default settings "
                f"(seed 0, {DEFAULT_SEEDS} seeds), not with "
                + ("--quick" if quick else f"--seed {seed} --seeds {seeds}"))
        return None
    made = json.loads(resources.files("deltaspec").joinpath("data").joinpath(REFERENCE_FILE)
                      .read_text()).get("made_with", {})
    if made.get("seeds", 1) != seeds:  # a reference of an older demo: no overlay, not a wrong one
        if log:
            log(f"no reference overlay: the shipped reference was made with {made.get('seeds', 1)} "
                f"seed(s) of an older demo, not {seeds}")
        return None
    return load_reference_results()


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def reference_from_report(report_dir: str | Path) -> dict[str, Any]:
    """The compact reference results (version, settings, tables) from a written demo report."""
    import pandas as pd

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

    doc = json.loads(training_json.read_text()) if training_json.is_file() else {}
    runs = [r for v in doc.values() for r in (v if isinstance(v, list) else [v])]
    env: dict[str, Any] = next((m.get("environment") for m in runs if m.get("environment")), {})
    seed = doc.get("base", {}).get("config", {}).get("train", {}).get("seed")
    seeds = max((len(v) for v in doc.values() if isinstance(v, list)), default=1)
    return {"command": "deltaspec demo --out DIR", "seed": seed, "seeds": seeds,
            "threads": env.get("threads"),
            "device": env.get("device"), "cpu": f"{cpu_model()} ({os.cpu_count()} cores)",
            "torch": env.get("torch")}


def readme_table(reference: dict[str, Any]) -> str:
    """The README's demo table (Markdown) from reference results: per method, seeds, trainable
    parameters, held-out accuracy (mean ± sd over seeds), tokens/s, peak memory and the verdict's
    metric (the top-1 energy share within the top r values, mean over seeds)."""
    names = {"lora": "LoRA", "multilora": "MultiLoRA", "full": "full FT"}
    r = reference["verdict"].get("top_k", 16)
    metric = {"share1_of_r": f"top-1 share in top {r}",  # an older reference: its own metric
              "normalized_entropy_topk": f"top-{r} normalised entropy"}.get(
        reference["verdict"].get("metric", ""), reference["verdict"].get("metric", "verdict metric"))
    lines = [f"| method | seeds | trainable params | held-out accuracy | tokens/s | peak memory | "
             f"{metric} |", "|---|---|---|---|---|---|---|"]
    for row in reference["training"]:
        if row["method"] not in names:
            continue
        sd = row.get("heldout_accuracy_sd")
        acc = f"{row['heldout_accuracy']:.3f}" + ("" if sd is None else f" ± {sd:.3f}")
        lines.append(f"| {names[row['method']]} | {row.get('seeds', 1)} | "
                     f"{row['trainable_params']:,.0f} | {acc} | "
                     f"{row['tokens_per_s'] / 1e3:.1f} k | {row['peak_memory_mb']:.1f} MiB | "
                     f"{reference['verdict']['values'][row['method']]:.3f} |")
    return "\n".join(lines) + "\n"


def load_reference_results(path: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """The shipped reference results (or those at ``path``) as the report's overlay tables."""
    import pandas as pd

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
