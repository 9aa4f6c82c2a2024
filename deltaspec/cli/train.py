"""``deltaspec train``: fine-tune the bundled reference model with LoRA, MultiLoRA or full FT.

The tiny base model is pretrained on first use and cached (by config hash); the fine-tune writes a
PEFT-style LoRA folder, a MultiLoRA folder or an HF-style full checkpoint, plus ``metrics.json``.
No math here: options are checked, :mod:`deltaspec.reference` does the work.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import click

from deltaspec.cli.options import DEVICE
from deltaspec.errors import DeltaspecError, UsageError


def _check_options(kw: dict[str, Any]) -> None:
    """Reject option values that click's types let through, with one-line messages."""
    for name in ("n", "r", "rank", "steps", "threads"):
        if kw[name] is not None and kw[name] < 1:
            raise UsageError(f"--{name} must be >= 1 (got {kw[name]})")
    for name in ("alpha", "lr"):
        if kw[name] is not None and not kw[name] > 0:
            raise UsageError(f"--{name} must be > 0 (got {kw[name]})")
    out = Path(kw["out"])
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    if kw["hf_model"] and kw["base_dir"]:
        raise UsageError("--hf-model and --base-dir exclude each other (the HF model is the base)")


def _default_base_dir(key: str) -> Path:
    """``<cache>/base-<hash>``: the cache ``deltaspec demo`` uses too ($DELTASPEC_CACHE or
    ~/.cache/deltaspec), so a base pretrained by one is reused by the other."""
    from deltaspec.demo import default_cache_dir

    return default_cache_dir() / f"base-{key}"


def _adapter(kw: dict[str, Any]) -> Any:
    """The adapter shape; for LoRA, --rank wins, else n·r with --match-params (the default)."""
    from deltaspec import reference as ref

    if kw["method"] == "lora" and kw["rank"] is not None:
        return ref.AdapterConfig(n=1, r=kw["rank"], alpha=kw["alpha"], match_params=False)
    return ref.AdapterConfig(n=kw["n"], r=kw["r"], alpha=kw["alpha"],
                             scaling_shape=kw["scaling"], match_params=kw["match_params"])


def resolve_device(name: str) -> str:
    """``auto`` → cuda when a GPU is present, else cpu; anything else checked against this
    machine (the analysis engine's one device rule)."""
    from deltaspec.engine.spectrum import resolve_device as engine_device

    return str(engine_device(name))


def _run(kw: dict[str, Any]) -> tuple[dict, dict | None]:
    """Pretrain (cached) or load the base, then fine-tune; return (metrics, base metrics)."""
    from deltaspec import reference as ref

    adapter = _adapter(kw)
    tcfg = ref.default_train_config(kw["method"], kw["quick"], kw["seed"])
    overrides = {k: kw[k] for k in ("steps", "lr") if kw[k] is not None}
    if overrides:
        tcfg = ref.TrainConfig(**{**tcfg.__dict__, **overrides,
                                  "warmup_steps": min(tcfg.warmup_steps,
                                                      overrides.get("steps", tcfg.steps) // 5)})
    log = None if kw["quiet"] else (lambda msg: click.echo(msg, err=True))
    out = Path(kw["out"])
    if kw["hf_model"]:
        from deltaspec.reference.hf import finetune_hf

        return finetune_hf(kw["method"], kw["hf_model"], out, adapter, tcfg,
                           quick=kw["quick"], seed=kw["seed"], threads=kw["threads"], log=log), None
    base_dir, base = _base(kw, out, log)
    metrics = ref.finetune(kw["method"], base_dir, out, adapter, tcfg, seed=kw["seed"],
                           device=kw["device"], threads=kw["threads"], log=log,
                           log_points=kw["log_points"])
    metrics["trajectory_log"] = _trajectory_log(out, base_dir, adapter)
    return metrics, base


def _trajectory_log(out: Path, base_dir: Path, adapter: Any) -> str | None:
    """``out/trajectory.csv`` from the log-point checkpoints, over the top n·r singular values
    (the K at which the three methods are compared); None without log points."""
    from deltaspec.reference.train import TRAJECTORY
    from deltaspec.trajectory import write_log

    path = write_log(out, out / TRAJECTORY, base_dir, top_k=adapter.n * adapter.r)
    return None if path is None else str(path)


def _base(kw: dict[str, Any], out: Path, log: Any) -> tuple[Path, dict]:
    """The base folder and its metrics: an existing reference base in --base-dir is used as it
    is; otherwise the base is pretrained (into --base-dir, or the hash-named default cache)."""
    from deltaspec import reference as ref
    from deltaspec.reference.configs import pretrain_hash, resolve_base_configs
    from deltaspec.reference.train import is_reference_base

    mcfg, pcfg, dcfg = resolve_base_configs(kw["quick"], kw["seed"])
    if kw["base_dir"] is None:
        base_dir = _default_base_dir(pretrain_hash(mcfg, pcfg, dcfg, kw["threads"], kw["device"]))
    else:
        base_dir = Path(kw["base_dir"])
        if (base_dir / "config.json").is_file() and (base_dir / "model.safetensors").is_file():
            if not is_reference_base(base_dir):
                raise UsageError(f"--base-dir {base_dir}: not a deltaspec reference base "
                                 "(for a Hugging Face model use --hf-model)")
            metrics_path = base_dir / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
            return base_dir, {**metrics, "cached": True, "path": str(base_dir)}
    base = ref.pretrain(base_dir, mcfg, pcfg, dcfg, seed=kw["seed"], device=kw["device"],
                        threads=kw["threads"], log=log)
    return base_dir, base


def _summary(m: dict, base: dict | None) -> str:
    """A short human-readable summary of one fine-tune."""
    adapter = (m.get("config") or {}).get("adapter") or {}
    lora_why = ("--rank" if adapter.get("n") == 1 and not adapter.get("match_params") else
                f"n·r = {adapter.get('n')}·{adapter.get('r')}, the trainable parameters of "
                f"MultiLoRA {adapter.get('n')} x {adapter.get('r')}" if adapter.get("match_params")
                else "--r, --no-match-params")
    shape = {"lora": f"rank {adapter.get('lora_rank')} ({lora_why})",
             "multilora": f"n={adapter.get('n')} x rank {adapter.get('r')}, "
                          f"scaling {adapter.get('scaling_shape')}",
             "full": "all weights"}[m["method"]]
    lines = [f"deltaspec train: {m['method']} ({shape}) -> {m['path']} [{m['checkpoint_format']}]"]
    if base is not None:
        how = "cached" if base.get("cached") else f"pretrained in {base['wall_time_s']:.1f} s"
        lines.append(f"  base:       {base['path']} ({how})")
    pct = 100 * m["trainable_params"] / m["total_params"]
    lines += [
        f"  trainable:  {m['trainable_params']:,} of {m['total_params']:,} params ({pct:.1f}%)",
        f"  loss:       {m['loss']['first']:.3f} -> {m['loss']['final']:.3f}",
        "  held-out exact-match accuracy:",
        *[f"    {t:<10} {a:6.1%}" for t, a in m["accuracy"].items()],
        f"    {'mean':<10} {m['accuracy_mean']:6.1%}",
        f"  tokens/s:   {m['tokens_per_s']:,.0f}   ({m['environment']['device']}, "
        f"{m['environment']['threads']} thread(s))",
        f"  peak mem:   {m['peak_memory_mb']:.1f} MiB ({m['peak_memory_method']})",
        f"  wall time:  {m['wall_time_s']:.1f} s",
    ]
    if m.get("trajectory_log"):
        lines.append(f"  trajectory: {m['trajectory_log']} (deltaspec trajectory of the log points)")
    return "\n".join(lines)


def _csv(m: dict) -> str:
    """One row per task: held-out and train accuracy."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["method", "task", "heldout_accuracy", "train_accuracy"])
    for task, acc in m["accuracy"].items():
        writer.writerow([m["method"], task, acc, m.get("train_accuracy", {}).get(task)])
    return buf.getvalue()


@click.command("train")
@click.option("--method", type=click.Choice(["lora", "multilora", "full"]), required=True,
              help="Fine-tuning method.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Output folder (checkpoint + metrics.json).")
@click.option("--base-dir", type=click.Path(file_okay=False), default=None,
              help="Base folder: a reference base already there is used as it is, otherwise "
                   "one is pretrained into it [default: $DELTASPEC_CACHE or ~/.cache/deltaspec, "
                   "/base-<config hash>: the cache deltaspec demo shares; reused when the hash "
                   "matches].")
@click.option("--n", type=int, default=4, show_default=True,
              help="MultiLoRA: parallel modules per layer.")
@click.option("--r", type=int, default=4, show_default=True,
              help="MultiLoRA: rank of each module; LoRA: rank n·r (16: the README's comparison) "
                   "with --match-params, r with --no-match-params.")
@click.option("--rank", type=int, default=None,
              help="LoRA only: this rank, whatever --n/--r say.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha [default: the rank, scale 1].")
@click.option("--scaling", type=click.Choice(["n", "n_out"]), default="n", show_default=True,
              help="MultiLoRA scaling factors: one per module, or one per module and output row.")
@click.option("--steps", type=int, default=None, help="Fine-tuning steps [default: tuned].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: tuned].")
@click.option("--match-params/--no-match-params", default=True, show_default=True,
              help="LoRA gets rank n·r: the trainable parameters of MultiLoRA n x r.")
@click.option("--log-points", type=click.IntRange(min=0), default=4, show_default=True,
              help="Save the update at this many evenly spaced steps (--out/trajectory/"
                   "checkpoint-N) and write their spectral trajectory to --out/trajectory.csv "
                   "(0: none; the reference model only, not --hf-model).")
@click.option("--quick", is_flag=True, help="Small model and few steps (a smoke test, seconds).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of data and training.")
@click.option("--threads", type=int, default=None,
              help="CPU threads, any count [default: 1, fastest for this small model on a shared "
                   "machine]. Same seed and thread count: bit-identical results.")
@click.option("--device", type=DEVICE, default="auto", show_default=True,
              help="auto (cuda when present), cpu, cuda or cuda:N.")
@click.option("--hf-model", type=click.Path(exists=True, file_okay=False), default=None,
              help="Adapt a local Hugging Face causal LM folder instead of the reference model.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="How to print the results.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def train(**kw: Any) -> None:
    """Fine-tune the bundled reference model (LoRA, MultiLoRA or full) on the task mixture.

    The base is pretrained on first use (cached by config hash). Writes a PEFT-style LoRA folder,
    a MultiLoRA folder or an HF-style full checkpoint into --out, with metrics.json, and prints
    the loss, the held-out exact-match accuracy per task, tokens/s and peak memory.
    """
    _check_options(kw)
    kw["device"] = resolve_device(kw["device"])
    try:
        metrics, base = _run(kw)
    except DeltaspecError:
        raise
    except (ValueError, OSError) as exc:
        raise DeltaspecError(str(exc).splitlines()[0] if str(exc) else repr(exc)) from exc
    if kw["fmt"] == "json":
        click.echo(json.dumps(metrics, indent=2))
    elif kw["fmt"] == "csv":
        click.echo(_csv(metrics), nl=False)
    else:
        click.echo(_summary(metrics, base))


COMMANDS = [train]
