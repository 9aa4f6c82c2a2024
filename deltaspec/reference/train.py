"""Pretraining of the tiny base and LoRA / MultiLoRA / full fine-tuning on the task mixture.

Fixed seeds, AdamW, cosine schedule with linear warm-up, gradient clipping. Every run returns its
metrics (loss curve, per-task held-out exact-match accuracy, tokens/s, peak memory, trainable
parameters, wall time, config) and writes them to ``metrics.json`` next to its checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configs import (
    METHODS,
    AdapterConfig,
    TrainConfig,
    default_train_config,
    pretrain_hash,
    resolve_base_configs,
    resolve_finetune_configs,
)
from .data import (
    TASK_FAMILIES,
    CharTokenizer,
    DataConfig,
    Example,
    TaskMixture,
    build_mixture,
    chance_accuracy,
)
from .evaluate import answer_loss, evaluate_tasks, finetune_batches, lm_batches
from .export import (
    full_config_dict,
    load_full_checkpoint,
    save_full_checkpoint,
    save_multilora,
    save_peft_lora,
    write_json_atomic,
)
from .layers import apply_adapters, lora_num_params, multilora_num_params
from .loop import Log, environment, seed_everything, thread_limit, train_loop
from .model import DeltaspecReferenceLM, ModelConfig, greedy_generate


def _encoder(tok: CharTokenizer) -> Callable[[Example], tuple[list[int], int]]:
    def encode(ex: Example) -> tuple[list[int], int]:
        prompt = [tok.bos_id, *tok.encode(ex.prompt)]
        return [*prompt, *tok.encode(ex.answer), tok.eos_id], len(prompt)

    return encode


def _accuracy_block(acc: dict[str, float], prefix: str = "",
                    data: DataConfig | None = None) -> dict:
    """Per-task accuracy, its mean and per-family means (and chance levels when ``data``)."""
    fams = {f: sum(acc[t] for t in ts) / len(ts) for f, ts in TASK_FAMILIES.items()
            if all(t in acc for t in ts)}
    out = {f"{prefix}accuracy": acc, f"{prefix}accuracy_mean": sum(acc.values()) / len(acc),
           f"{prefix}accuracy_by_family": fams}
    if data is not None:
        out["chance_accuracy"] = {t: chance_accuracy(t, data) for t in acc}
    return out


def _samples(model: nn.Module, heldout: dict[str, list[Example]], tok: CharTokenizer) -> list:
    """Greedy completions of the first two held-out prompts of each task (for a human to read)."""
    exs = [e for exs in heldout.values() for e in exs[:2]]
    prompts = [[tok.bos_id, *tok.encode(e.prompt)] for e in exs]
    outs = greedy_generate(model, prompts, max_new_tokens=16, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [{"task": e.task, "prompt": e.prompt, "answer": e.answer, "completion": tok.decode(o)}
            for e, o in zip(exs, outs, strict=True)]


def cached_base(base_dir: str | os.PathLike, key: str) -> bool:
    """Whether ``base_dir`` already holds a complete base checkpoint with cache key ``key``."""
    cfg_path, weights = Path(base_dir) / "config.json", Path(base_dir) / "model.safetensors"
    if not (cfg_path.is_file() and weights.is_file()):
        return False
    try:
        return json.loads(cfg_path.read_text()).get("deltaspec_pretrain_hash") == key
    except (OSError, json.JSONDecodeError):
        return False


def is_reference_base(folder: Path) -> bool:
    """True when ``folder/config.json`` is that of a deltaspec reference base."""
    try:
        return "deltaspec_pretrain_hash" in json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False


def _check_overwrite(base: Path, overwrite: bool) -> None:
    """Refuse to replace a folder that holds something other than a reference base."""
    if not (base / "config.json").exists():
        return
    if not is_reference_base(base):
        raise ValueError(f"{base}: holds a config.json that is not a deltaspec reference base; "
                         "choose another base folder")
    if not overwrite:
        raise ValueError(f"{base}: holds a reference base pretrained with other settings; "
                         "choose another base folder")


def _pretrain_streams(mix: TaskMixture, tok: CharTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token streams (bos line eos bos line eos ...) of the training and validation lines (5%)."""
    n_val = max(1, len(mix.pretrain_lines) // 20)

    def stream(lines: list[str]) -> torch.Tensor:
        return torch.tensor([t for ln in lines for t in (tok.bos_id, *tok.encode(ln), tok.eos_id)])

    return stream(mix.pretrain_lines[n_val:]), stream(mix.pretrain_lines[:n_val])


def pretrain(
    base_dir: str | os.PathLike,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
    quick: bool = False,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    overwrite: bool = True,
    log: Log | None = None,
) -> dict:
    """Pretrain the base LM on the plain-text corpus and save it to ``base_dir`` (a cache).

    When ``base_dir`` already holds a base with the same config hash, it is reused and its
    ``metrics.json`` returned with ``"cached": True``. A base with another hash is replaced only
    when ``overwrite``; a folder holding anything else is never replaced (ValueError).
    """
    mcfg, tcfg, dcfg = resolve_base_configs(quick, seed, model_config, train_config, data_config)
    key, base = pretrain_hash(mcfg, tcfg, dcfg, threads, device), Path(base_dir)
    if cached_base(base, key):
        metrics_path = base / "metrics.json"
        cached = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        return {**cached, "cached": True, "path": str(base)}
    _check_overwrite(base, overwrite)
    wall = time.perf_counter()
    with thread_limit(threads) as n_threads:
        seed_everything(tcfg.seed)
        tok, mix = CharTokenizer(), build_mixture(dcfg)
        if tok.vocab_size != mcfg.vocab_size:
            raise ValueError(f"model vocab_size {mcfg.vocab_size} != tokenizer {tok.vocab_size}")
        train_stream, val_stream = _pretrain_streams(mix, tok)
        model = DeltaspecReferenceLM(mcfg).to(device)
        if log:
            log(f"pretraining base ({sum(p.numel() for p in model.parameters())} params) -> {base}")
        batches = lm_batches(train_stream, tcfg.batch_size, tcfg.seq_len, tcfg.seed, device)
        stats = train_loop(model, list(model.parameters()), batches, tcfg, device, log=log)
        val_loss = _val_loss(model, val_stream, tcfg.seq_len, device)
        acc = evaluate_tasks(model, mix.heldout, _encoder(tok), tok.pad_id, device)
        extra = {"deltaspec_pretrain_hash": key, "deltaspec_data_config": dcfg.to_dict()}
        save_full_checkpoint(model.cpu(), base, full_config_dict(mcfg, extra))
    n_params = sum(p.numel() for p in model.parameters())
    metrics = {"method": "base", "stage": "pretrain", "path": str(base), "cached": False,
               **stats, "val_loss": val_loss, **_accuracy_block(acc, data=dcfg),
               "trainable_params": n_params, "total_params": n_params,
               "wall_time_s": time.perf_counter() - wall,
               "environment": environment(device, n_threads),
               "config": {"model": mcfg.to_dict(), "train": asdict(tcfg), "data": dcfg.to_dict()}}
    write_json_atomic(base / "metrics.json", metrics)
    return metrics


@torch.no_grad()
def _val_loss(model: nn.Module, stream: torch.Tensor, seq_len: int, device: str) -> float:
    """Mean next-token loss over consecutive windows of the held-out pretraining text."""
    n = (len(stream) - 1) // seq_len
    x = stream[: n * seq_len].view(n, seq_len).to(device)  # (N, T)
    y = stream[1 : n * seq_len + 1].view(n, seq_len).to(device)  # (N, T)
    logits = model(x)  # (N, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def make_trainable(
    model: nn.Module, method: str, adapter: AdapterConfig
) -> tuple[dict, list[nn.Parameter]]:
    """Unfreeze everything ("full") or wrap the target layers in adapters: (layers, params)."""
    layers: dict = {}
    if method == "full":
        model.requires_grad_(True)
    else:
        r = adapter.lora_rank() if method == "lora" else adapter.r
        layers = apply_adapters(model, method, adapter.target_modules, r=r, n=adapter.n,
                                alpha=adapter.alpha, scaling_shape=adapter.scaling_shape,
                                init=adapter.init)
    return layers, [p for p in model.parameters() if p.requires_grad]


def _prepare_model(
    method: str, base_dir: Path, adapter: AdapterConfig, device: str
) -> tuple[DeltaspecReferenceLM, dict, dict, list[nn.Parameter]]:
    """Load the base and make it trainable for ``method``: (model, base config, layers, params)."""
    model, base_config = load_full_checkpoint(base_dir)
    model = model.to(device)
    layers, params = make_trainable(model, method, adapter)
    return model, base_config, layers, params


def _formula_params(method: str, layers: dict) -> int | None:
    """Trainable parameters predicted by the closed-form formulas (None for full fine-tuning)."""
    if method == "lora":
        return sum(lora_num_params(m.base.in_features, m.base.out_features, m.r)
                   for m in layers.values())
    if method == "multilora":
        return sum(multilora_num_params(m.base.in_features, m.base.out_features, m.n, m.r,
                                        m.scaling_shape) for m in layers.values())
    return None


def _save_method(
    method: str, model: nn.Module, layers: dict, out: Path, base: Path, base_config: dict
) -> str:
    """Write the checkpoint of ``method`` into ``out``; return the format name."""
    targets = sorted({p.rpartition(".")[2] for p in layers})
    if method == "lora":
        save_peft_lora(layers, out, str(base), targets)
        return "peft-lora"
    if method == "multilora":
        save_multilora(layers, out, str(base), targets)
        return "multilora"
    drop = ("deltaspec_pretrain_hash", "deltaspec_data_config")
    config = {k: v for k, v in base_config.items() if k not in drop}
    save_full_checkpoint(model.cpu(), out, {**config, "deltaspec_finetuned_from": str(base)})
    return "hf-full"


TRAJECTORY = "trajectory"  # sub-folder of a fine-tune's output with its log-point checkpoints


def snapshots(method: str, model: nn.Module, layers: dict, out: Path, base: Path,
              base_config: dict, steps: int, points: int) -> Callable[[int], None] | None:
    """The ``on_step`` hook that writes the update at ``points`` evenly spaced steps into
    ``out/trajectory/checkpoint-N`` (the method's own format; None when ``points`` is 0)."""
    if points <= 0:
        return None
    every = max(1, steps // points)
    shutil.rmtree(out / TRAJECTORY, ignore_errors=True)  # an earlier run's log points

    def save(step: int) -> None:
        if step % every == 0:
            in_place = method != "full" or next(model.parameters()).device.type == "cpu"
            _save_method(method, model if in_place else copy.deepcopy(model), layers,
                         out / TRAJECTORY / f"checkpoint-{step}", base, base_config)

    return save


def base_data_config(base_dir: str | os.PathLike) -> DataConfig | None:
    """The DataConfig a reference base was pretrained with (None when the folder has none)."""
    try:
        stored = json.loads((Path(base_dir) / "config.json").read_text())["deltaspec_data_config"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None
    fields = DataConfig.__dataclass_fields__
    stored = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in fields}
    return DataConfig(**stored)


def finetune(
    method: str,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    adapter: AdapterConfig | None = None,
    train_config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
    quick: bool = False,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    log: Log | None = None,
    log_points: int = 0,
) -> dict:
    """Fine-tune the base in ``base_dir`` on the task mixture with ``method`` and save to ``out_dir``.

    ``method`` is "lora" (PEFT-style adapter), "multilora" (MultiLoRA folder) or "full" (HF-style
    full checkpoint). ``data_config`` defaults to the one stored with the base (same facts).
    ``log_points``: also save the update at that many evenly spaced steps into
    ``out_dir/trajectory/checkpoint-N`` (what ``deltaspec trajectory`` reads).
    Returns the metrics, also written to ``out_dir/metrics.json``.
    """
    adapter, tcfg, dcfg = resolve_finetune_configs(
        method, quick, seed, adapter, train_config, data_config or base_data_config(base_dir))
    base, out = Path(base_dir).resolve(), Path(out_dir)
    wall = time.perf_counter()
    with thread_limit(threads) as n_threads:
        seed_everything(tcfg.seed)
        tok, mix = CharTokenizer(), build_mixture(dcfg)
        encode = _encoder(tok)
        model, base_config, layers, params = _prepare_model(method, base, adapter, device)
        if log:
            log(f"fine-tuning {method}: {sum(p.numel() for p in params)} trainable params")
        train_enc = {t: [encode(e) for e in exs] for t, exs in mix.train.items()}
        batches = finetune_batches(train_enc, tcfg.batch_size, tcfg.seed, tok.pad_id, device)
        val_enc = [encode(e) for exs in mix.validation.values() for e in exs]
        hook = snapshots(method, model, layers, out, base, base_config, tcfg.steps, log_points)
        stats = train_loop(model, params, batches, tcfg, device, log=log,
                           evaluate=lambda: answer_loss(model, val_enc, tok.pad_id, device),
                           on_step=hook)
        acc = evaluate_tasks(model, mix.heldout, encode, tok.pad_id, device)
        train_acc = evaluate_tasks(model, mix.train, encode, tok.pad_id, device, limit=64)
        samples = _samples(model, mix.heldout, tok)
        n_total = sum(p.numel() for p in model.parameters())
        ckpt = _save_method(method, model, layers, out, base, base_config)
    metrics = {
        "method": method, "stage": "finetune", "path": str(out), "base_path": str(base),
        "checkpoint_format": ckpt, "base_sha256": file_sha256(base / "model.safetensors"),
        **stats, **_accuracy_block(acc, data=dcfg),
        **_accuracy_block(train_acc, "train_"), "base_accuracy": _base_accuracy(base),
        "trainable_params": sum(p.numel() for p in params),
        "trainable_params_formula": _formula_params(method, layers),
        "total_params": n_total, "wall_time_s": time.perf_counter() - wall, "samples": samples,
        "environment": environment(device, n_threads),
        "config": {"model": base_config, "train": asdict(tcfg), "data": dcfg.to_dict(),
                   "adapter": None if method == "full" else
                   {**asdict(adapter), "lora_rank": adapter.lora_rank()}},
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file (the base's weights, recorded in every fine-tune's metrics: which base
    it was trained from, whatever the cache's history), None when it is missing."""
    import hashlib

    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _base_accuracy(base: Path) -> dict | None:
    """Held-out accuracy of the base itself, from its metrics.json (None if absent)."""
    try:
        return json.loads((base / "metrics.json").read_text()).get("accuracy")
    except (OSError, json.JSONDecodeError):
        return None


def run_all(
    out_dir: str | os.PathLike,
    quick: bool = False,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    adapter: AdapterConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_config: ModelConfig | None = None,
    data_config: DataConfig | None = None,
    pretrain_config: TrainConfig | None = None,
    finetune_configs: dict[str, TrainConfig] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    log: Log | None = None,
    log_points: int = 0,
) -> dict[str, dict]:
    """Pretrain (or reuse) the base, then fine-tune every method of ``methods``.

    Writes ``out_dir/base`` and ``out_dir/<method>`` for each method (with ``log_points``, also
    ``out_dir/<method>/trajectory/checkpoint-N``: see :func:`finetune`) and returns
    ``{"base": base metrics, "<method>": metrics, ...}``. With ``cache_dir``, the base is trained
    once into ``cache_dir/base-<hash>`` and copied into ``out_dir/base``.
    """
    out = Path(out_dir)
    mcfg, pcfg, dcfg = resolve_base_configs(quick, seed, model_config, pretrain_config, data_config)
    key = pretrain_hash(mcfg, pcfg, dcfg, threads, device)
    base_dir = Path(cache_dir) / f"base-{key}" if cache_dir else out / "base"
    results = {"base": pretrain(base_dir, mcfg, pcfg, dcfg, seed=seed, device=device,
                                threads=threads, log=log)}
    if cache_dir and not cached_base(out / "base", key):
        (out / "base").mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "metrics.json", "config.json"):  # config last
            tmp = out / "base" / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(base_dir / name, tmp)
            os.replace(tmp, out / "base" / name)
    for method in methods:
        tcfg = (finetune_configs or {}).get(method) or default_train_config(method, quick, seed)
        results[method] = finetune(method, out / "base", out / method, adapter, tcfg, dcfg,
                                   seed=seed, device=device, threads=threads, log=log,
                                   log_points=log_points)
    return results
