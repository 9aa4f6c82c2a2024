"""The democracy sweep: is MultiLoRA's ΔW more "democratic" than LoRA's, and why?

    python analyses/democracy_sweep.py --out figures/sweep            # the committed run
    python analyses/democracy_sweep.py --out /tmp/s --quick           # seconds-scale smoke run
    python analyses/democracy_sweep.py --out figures/sweep --tables-only   # re-render from runs

On one pretrained reference base (``deltaspec.reference``; ``--model``), fine-tunes LoRA
(rank 16), MultiLoRA 4 × 4 (matched trainable parameters) and full fine-tuning by default
(``--variants``: also MultiLoRA n ∈ {1, 2, 8} and LoRA-initialised arms), several seeds each (the
seed sets initialisation and batch order; the base and the data are shared). Every run stops by
patience on the held-out loss (the validation split, see ``deltaspec.reference.data``) or at
``max_steps``, ending on the best parameters. Each run is analysed over the adapted linear layers
only (the modules every arm has), with every σ of every module stored, the K-resolved metrics
within the top r = 16 (the pre-registered primary: :data:`PRIMARY`) and the nulls of
:mod:`deltaspec.report.null_updates`. Seeds: ``seeds`` of every arm, then more of the
:data:`ADAPTIVE` pair until the primary interval is within ± ``half_width``, ``max_seeds`` is
reached or ``wall_minutes`` have passed (no run starts after that).

Each finished run is appended to ``OUT/runs.jsonl`` at once (a killed sweep keeps its runs and a
rerun skips them); the tables (``OUT/summary.csv``, ``OUT/tables.md``), ``OUT/results.json`` and
the figures are rebuilt from that file, and so are the tables of ``analyses/democracy_sweep.md``
(between its ``<!-- tables -->`` markers). Runs are seed-major (every method at seed 0, then at
seed 1, …) so that a partial sweep is balanced. Several processes may share one OUT and work
folder (each run is claimed by a ``<run>.claim`` file): start the same command 2–3 times to use
more cores; after a killed process, delete the claims of the runs missing from runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from sweep_stats import render_all  # noqa: E402

R = 16  # the common structural rank r of the adapters (n·r): the K of the rank-matched metrics
K = R  # the top-K of the legacy entropy columns (``normalized_entropy_topk``)
PRIMARY = "share1_of_r"  # pre-registered: top-1 energy share within the top r (lower: flatter)
ADAPTIVE = ("lora", "multilora-n4")  # the primary pair: seeds are added to these two arms


@dataclass(frozen=True)
class Variant:
    """One arm of the sweep: a training method and its adapter shape."""

    method: str  # lora | multilora | full
    n: int = 1
    r: int = 16
    init: str = "multilora"
    extra: bool = False  # run only after every core arm has all its seeds
    note: str = field(default="", compare=False)


VARIANTS: dict[str, Variant] = {
    "lora": Variant("lora", 1, 16, note="LoRA rank 16"),
    "multilora-n1": Variant("multilora", 1, 16, note="MultiLoRA 1 × 16"),
    "multilora-n2": Variant("multilora", 2, 8, note="MultiLoRA 2 × 8"),
    "multilora-n4": Variant("multilora", 4, 4, note="MultiLoRA 4 × 4"),
    "multilora-n8": Variant("multilora", 8, 2, note="MultiLoRA 8 × 2"),
    "full": Variant("full", note="full fine-tuning"),
    "multilora-n4-lorainit": Variant("multilora", 4, 4, "lora", note="MultiLoRA 4 × 4, LoRA init"),
    "multilora-n1-lorainit": Variant("multilora", 1, 16, "lora", extra=True,
                                     note="MultiLoRA 1 × 16, LoRA init"),
}


@dataclass(frozen=True)
class Budget:
    """Steps and cadence of every fine-tune (the same for every arm)."""

    max_steps: int = 800  # the step cap: what 45 minutes of 2 shared cores allow (see the write-up)
    eval_every: int = 100
    patience: int = 2
    min_delta: float = 0.002  # an improvement smaller than this (nats) does not reset patience
    lr_drops: int = 1  # on a plateau the learning rate drops (x0.2) once, the next plateau ends it
    warmup_steps: int = 50
    min_lr_ratio: float = 1.0  # 1.0: constant learning rate after warm-up (no decay to a cap)
    seeds: int = 3  # seeds of every arm before any is added
    max_seeds: int = 10  # the cap of the adaptive arms (ADAPTIVE)
    half_width: float = 0.01  # stop adding seeds once the primary interval is within ± this
    wall_minutes: float = 45.0  # no run is started after this much wall time
    quick: bool = False  # the small model and its data (the reference's quick preset)
    pretrain_steps: int | None = None  # None: the reference's tuned pretraining


QUICK = Budget(max_steps=12, eval_every=4, patience=2, min_delta=0.0, lr_drops=0, warmup_steps=2,
               seeds=2, max_seeds=3, half_width=1e-9, quick=True, pretrain_steps=20)
CORE = ("lora", "multilora-n4", "full")  # the arms of the default run


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="results folder (runs.jsonl, tables, PNGs)")
    p.add_argument("--work", type=Path, default=None,
                   help="checkpoints folder (default: OUT/../.sweep-work/<out name>; not committed)")
    p.add_argument("--quick", action="store_true", help="small model, few steps, 2 seeds (tests)")
    p.add_argument("--model", choices=("small", "default"), default="small",
                   help="reference model: 'small' (64 wide, 2 layers: the quick preset) or "
                        "'default' (128 wide, 4 layers) [default: small, what 2 shared cores allow]")
    p.add_argument("--seeds", type=int, default=None, help="first seeds of every arm (default 3)")
    p.add_argument("--max-seeds", type=int, default=None, help="seed cap of the adaptive arms (10)")
    p.add_argument("--wall-minutes", type=float, default=None, help="start no run after this (45)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--patience", type=int, default=None)
    p.add_argument("--min-delta", type=float, default=None)
    p.add_argument("--variants", default=None,
                   help=f"comma list of {', '.join(VARIANTS)} (default: {','.join(CORE)})")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (fixed: reproducible)")
    p.add_argument("--writeup", default=str(HERE / "democracy_sweep.md"),
                   help="write-up whose tables are regenerated ('' for none)")
    p.add_argument("--tables-only", action="store_true", help="only re-render from runs.jsonl")
    return p.parse_args(argv)


def _budget(a: argparse.Namespace) -> Budget:
    b = QUICK if a.quick else Budget()
    keys = ("seeds", "max_seeds", "max_steps", "wall_minutes", "eval_every", "patience", "min_delta")
    over: dict[str, Any] = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    over["quick"] = a.quick or a.model == "small"
    return Budget(**{**b.__dict__, **over})


def _train_config(v: Variant, b: Budget, seed: int) -> Any:
    from deltaspec.reference import TrainConfig, default_train_config

    d = default_train_config(v.method, False, seed)  # the tuned learning rates
    return TrainConfig(steps=b.max_steps, lr=d.lr, warmup_steps=b.warmup_steps,
                       min_lr_ratio=b.min_lr_ratio, weight_decay=d.weight_decay, seed=seed,
                       eval_every=b.eval_every, patience=b.patience, min_delta=b.min_delta,
                       lr_drops=b.lr_drops)


def _k_row(values: Any) -> dict[str, float]:
    """The K-resolved metrics (at the common rank R) and the descriptive all-σ ones of one σ."""
    from deltaspec import metrics as M
    from deltaspec.metrics.within import k_metrics

    return {**k_metrics(values, R), "normalized_entropy_topk": M.normalized_entropy(values[:K]),
            "effective_rank_topk": M.effective_rank(values[:K]),
            "top1_share": M.top_share(values, 1), "top8_share": M.top_share(values, 8),
            "normalized_entropy_all": M.normalized_entropy(values)}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}


def spectral_row(path: Path, base: Path, seed: int = 0) -> dict[str, Any]:
    """The democracy metrics of one checkpoint over the adapted linear layers only (the modules
    every arm has: a full fine-tune's ``lm_head`` and embeddings are left out), their nulls, and
    every module's σ (``per_module``), so that anyone can re-slice."""
    import deltaspec
    from deltaspec.reference import ALL_LINEAR
    from deltaspec.report.null_updates import null_spectra

    deltas = deltaspec.load(path, base if (path / "config.json").exists() else None,
                            discover_base=False)
    deltas = {n: d for n, d in deltas.items() if n.rpartition(".")[2] in ALL_LINEAR}
    nulls = null_spectra(deltas, seed, project_rank=R, source=path)
    mods, null_rows = [], {kind: [] for kind in nulls if kind != "scaling_spread"}
    for name, d in deltas.items():
        s = deltaspec.spectrum(d).values.double().numpy()
        row = {"module": name, "sigma": [float(f"{v:.7g}") for v in s], **_k_row(s)}
        for kind in null_rows:
            row[f"null_{kind}"] = _k_row(nulls[kind][name])
            null_rows[kind].append(row[f"null_{kind}"])
        if "scaling_spread" in nulls:
            row["scaling_spread"] = float(nulls["scaling_spread"][name][0])
        mods.append(row)
    plain = [{k: v for k, v in m.items() if isinstance(v, float) and k != "scaling_spread"}
             for m in mods]
    out = {**_mean(plain), "modules": len(mods), "r": R,
           "nulls": {kind: _mean(rows) for kind, rows in null_rows.items()}, "per_module": mods}
    if "scaling_spread" in nulls:
        out["scaling_spread"] = sum(m["scaling_spread"] for m in mods) / len(mods)
    return out


def run_one(name: str, seed: int, b: Budget, base: Path, work: Path, threads: int) -> dict:
    """Fine-tune one arm at one seed, analyse its ΔW, return the run record."""
    from deltaspec.reference import AdapterConfig, finetune

    v = VARIANTS[name]
    out = work / f"{name}-s{seed}"
    adapter = AdapterConfig(n=v.n, r=v.r, init=v.init, match_params=False)
    start = time.perf_counter()
    m = finetune(v.method, base, out, adapter, _train_config(v, b, seed), seed=seed,
                 threads=threads)
    spec = spectral_row(out, base, seed)
    es = m.get("early_stopping", {})
    return {"variant": name, "seed": seed, "method": v.method, "n": v.n, "r": v.r, "init": v.init,
            "trainable_params": m["trainable_params"], "accuracy": m["accuracy"],
            "accuracy_mean": m["accuracy_mean"], "tokens_per_s": m["tokens_per_s"],
            "peak_memory_mb": m["peak_memory_mb"], "steps_run": m["steps_run"],
            "best_step": es.get("best_step"), "best_heldout_loss": es.get("best_heldout_loss"),
            "lr_drops_at": es.get("lr_drops_at"), "base_sha256": m.get("base_sha256"),
            "wall_s": time.perf_counter() - start, **spec}


def _done(runs_file: Path) -> set[tuple[str, int]]:
    if not runs_file.exists():
        return set()
    return {(r["variant"], r["seed"]) for r in map(json.loads, runs_file.read_text().splitlines())
            if r.get("variant")}


def _claim(work: Path, name: str, seed: int) -> bool:
    """Take the run (name, seed) for this process: False when another process holds it."""
    try:
        os.close(os.open(work / f"{name}-s{seed}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _precise(runs_file: Path, b: Budget) -> bool:
    """Whether the primary MultiLoRA − LoRA interval is within ± ``b.half_width`` already."""
    from sweep_stats import load_runs, primary_interval

    iv = primary_interval(load_runs(runs_file))
    return iv is not None and (iv[1] - iv[0]) / 2 <= b.half_width


def _next_run(names: list[str], b: Budget, runs_file: Path, work: Path,
              started: float) -> tuple[str, int] | None:
    """The next (arm, seed) for this process: every arm's first ``b.seeds`` seeds (seed-major),
    then seeds of the ADAPTIVE arms until the primary interval is precise enough, the seed cap is
    reached or the wall budget is spent (None: nothing left to start)."""
    if time.perf_counter() - started > 60 * b.wall_minutes:
        return None
    done = _done(runs_file)
    core = [n for n in names if not VARIANTS[n].extra]
    extra = [n for n in names if VARIANTS[n].extra]
    first = [(n, s) for group in (core, extra) for s in range(b.seeds) for n in group]
    more = [(n, s) for s in range(b.seeds, b.max_seeds) for n in ADAPTIVE if n in names]
    for i, (name, seed) in enumerate(first + more):
        if i >= len(first) and _precise(runs_file, b):
            return None
        if (name, seed) not in done and _claim(work, name, seed):
            return name, seed
    return None


def _base(work: Path, b: Budget, threads: int) -> tuple[Path, dict]:
    from deltaspec.reference import TrainConfig, default_train_config, pretrain

    base = work / "base"
    cfg = None
    if b.pretrain_steps is not None:  # the test's smoke run: a few steps are enough
        d = default_train_config("pretrain", b.quick)
        cfg = TrainConfig(**{**d.__dict__, "steps": b.pretrain_steps,
                             "warmup_steps": max(1, b.pretrain_steps // 10)})
    return base, pretrain(base, train_config=cfg, quick=b.quick, seed=0, threads=threads)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    b = _budget(a)
    names = a.variants.split(",") if a.variants else list(CORE)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    runs_file = a.out / "runs.jsonl"
    if not a.tables_only:
        work = a.work or a.out.resolve().parent / ".sweep-work" / a.out.name
        base, base_metrics = _base(work, b, a.threads)
        meta = {"budget": b.__dict__, "model": "small" if b.quick else "default",
                "threads": a.threads, "k": K, "r": R, "primary": PRIMARY, "base": base_metrics.get(
            "accuracy_mean"), "variants": {n: v.note for n, v in VARIANTS.items()},
            "cpu": _cpu(), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        (a.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        started = time.perf_counter()
        while (nxt := _next_run(names, b, runs_file, work, started)) is not None:
            name, seed = nxt
            rec = run_one(name, seed, b, base, work, a.threads)
            with runs_file.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(f"{name} seed {seed}: acc {rec['accuracy_mean']:.3f}  "
                  f"{PRIMARY} {rec[PRIMARY]:.4f}  steps {rec['steps_run']}  "
                  f"{rec['wall_s']:.0f} s", flush=True)
            render_all(runs_file, a.out, Path(a.writeup) if a.writeup else None)
    render_all(runs_file, a.out, Path(a.writeup) if a.writeup else None)
    return 0


def _cpu() -> str:
    from deltaspec.machine import cpu_model

    return f"{cpu_model()} ({os.cpu_count()} cores)"


if __name__ == "__main__":
    raise SystemExit(main())
