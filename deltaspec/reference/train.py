"""Pretraining of the tiny base and LoRA / MultiLoRA / full fine-tuning on the task mixture.

Fixed seeds, AdamW, cosine schedule with linear warm-up, gradient clipping. Every run returns its
metrics (loss curve, per-task held-out exact-match accuracy, tokens/s, peak memory, trainable
parameters, wall time, config) and writes them to ``metrics.json`` next to its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import TASK_FAMILIES, CharTokenizer, DataConfig, Example, build_mixture
from .evaluate import IGNORE, MemoryMeter, evaluate_tasks, finetune_batches, lm_batches
from .export import (
    full_config_dict,
    load_full_checkpoint,
    save_full_checkpoint,
    save_multilora,
    save_peft_lora,
    write_json_atomic,
)
from .layers import SCALING_SHAPES, apply_adapters, lora_num_params, multilora_num_params
from .model import DeltaspecReferenceLM, ModelConfig, greedy_generate

METHODS = ("lora", "multilora", "full")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PRETRAIN_VERSION = 1  # bump when pretraining code changes what a cached base would contain
Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule of one training run (pretraining or one fine-tune)."""

    # Optimiser steps: the main knob of the time budget (see default_train_config).
    steps: int = 300
    # Sequences per step: 32 keeps 2 CPU cores busy without slowing each step much.
    batch_size: int = 32
    # Peak learning rate: adapters take ~10x the full fine-tune's, as in the MultiLoRA paper.
    lr: float = 1e-3
    # Linear warm-up steps: ~10% of a run keeps AdamW's first noisy steps small.
    warmup_steps: int = 30
    # Cosine decays to this fraction of lr, not to zero, so the last steps still learn.
    min_lr_ratio: float = 0.1
    # Decoupled weight decay: none for adapters (their ΔW is already small), light for weights.
    weight_decay: float = 0.0
    # AdamW betas; beta2 = 0.98 adapts faster on short runs than 0.999.
    betas: tuple[float, float] = (0.9, 0.98)
    # Global gradient-norm clip: protects the short warm-up from spikes.
    grad_clip: float = 1.0
    # Window length of pretraining batches (fine-tuning uses whole examples instead).
    seq_len: int = 96
    # Seed of initialisation and batch order.
    seed: int = 0


@dataclass(frozen=True)
class AdapterConfig:
    """LoRA / MultiLoRA shape. With ``match_params``, LoRA gets rank n·r, MultiLoRA n × rank r."""

    # Parallel MultiLoRA modules per layer (the paper's n).
    n: int = 4
    # Rank of each MultiLoRA module; LoRA's rank when match_params is off.
    r: int = 4
    # LoRA alpha; None means alpha = the method's own rank (scale alpha/r = 1).
    alpha: float | None = None
    # MultiLoRA scaling factors: one scalar per module ("n") or one per output row ("n_out").
    scaling_shape: str = "n"
    # Linear layers that get adapters: all of them, as in the paper's LLaMA setup.
    target_modules: tuple[str, ...] = ALL_LINEAR
    # Give LoRA rank n·r, i.e. the same trainable parameters as MultiLoRA minus its scalings.
    match_params: bool = True

    def __post_init__(self) -> None:
        if self.n < 1 or self.r < 1:
            raise ValueError(f"n and r must be >= 1 (got n={self.n}, r={self.r})")
        if self.scaling_shape not in SCALING_SHAPES:
            raise ValueError(f"scaling_shape must be one of {SCALING_SHAPES}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha})")
        if not self.target_modules:
            raise ValueError("target_modules must not be empty")

    def lora_rank(self) -> int:
        """The rank plain LoRA uses: n·r when matching parameters, else r."""
        return self.n * self.r if self.match_params else self.r


def quick_model_config() -> ModelConfig:
    """The smaller model of ``quick`` runs (smoke tests, ~1 minute for the whole chain)."""
    return ModelConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=176)


def default_train_config(stage: str, quick: bool = False, seed: int = 0) -> TrainConfig:
    """Tuned defaults for ``stage`` in {"pretrain", "lora", "multilora", "full"}."""
    table = {  # stage: (steps, quick steps, lr, warmup, weight decay)
        "pretrain": (700, 150, 3e-3, 50, 0.01),
        "lora": (300, 40, 3e-3, 30, 0.0),
        "multilora": (300, 40, 3e-3, 30, 0.0),
        "full": (300, 40, 3e-4, 30, 0.01),
    }
    if stage not in table:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(table)}")
    steps, qsteps, lr, warm, wd = table[stage]
    steps = qsteps if quick else steps
    return TrainConfig(steps=steps, lr=lr, warmup_steps=min(warm, steps // 5),
                       weight_decay=wd, seed=seed)


def quick_data_config(seed: int = 0) -> DataConfig:
    """Smaller data for quick runs (fewer pretraining lines and held-out examples)."""
    return DataConfig(seed=seed, n_pretrain_lines=3000, n_train_per_task=400, n_heldout_per_task=32)


@contextmanager
def _threads(n: int | None) -> Iterator[int]:
    """Use at most ``n`` (default 2) intra-op threads inside the block, then restore."""
    before = torch.get_num_threads()
    want = max(1, min(n or 2, os.cpu_count() or 1))
    torch.set_num_threads(want)
    try:
        yield want
    finally:
        torch.set_num_threads(before)


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _loss_summary(losses: list[float], points: int = 40) -> dict:
    """First/final/min loss and a curve of window means (``points`` points at most)."""
    window = max(1, len(losses) // points)
    curve = [
        [i + window, sum(losses[i : i + window]) / len(losses[i : i + window])]
        for i in range(0, len(losses), window)
    ]
    tail = losses[-max(1, len(losses) // 10) :]
    return {"first": losses[0], "final": sum(tail) / len(tail), "min": min(losses), "curve": curve}


def train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    log: Log | None = None,
) -> dict:
    """Run ``cfg.steps`` AdamW steps on ``params``; return loss, throughput and memory stats."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    meter, forward = MemoryMeter(model, device), logits_fn or model
    losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    model.train()
    for step in range(cfg.steps):
        inputs, labels = next(batches)
        with meter.forward():
            logits = forward(inputs)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        meter.after_step(opt)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += inputs.numel()
        if log and (step + 1) % max(1, cfg.steps // 5) == 0:
            log(f"  step {step + 1}/{cfg.steps}  loss {losses[-1]:.4f}")
    seconds = time.perf_counter() - start
    model.eval()
    return {"loss": _loss_summary(losses), "train_tokens": tokens, "train_time_s": seconds,
            "tokens_per_s": tokens / seconds, **meter.summary()}


def _encoder(tok: CharTokenizer) -> Callable[[Example], tuple[list[int], int]]:
    def encode(ex: Example) -> tuple[list[int], int]:
        prompt = [tok.bos_id, *tok.encode(ex.prompt)]
        return [*prompt, *tok.encode(ex.answer), tok.eos_id], len(prompt)

    return encode


def _accuracy_block(acc: dict[str, float], prefix: str = "") -> dict:
    fams = {f: sum(acc[t] for t in ts) / len(ts) for f, ts in TASK_FAMILIES.items()
            if all(t in acc for t in ts)}
    return {f"{prefix}accuracy": acc, f"{prefix}accuracy_mean": sum(acc.values()) / len(acc),
            f"{prefix}accuracy_by_family": fams}


def _samples(model: nn.Module, heldout: dict[str, list[Example]], tok: CharTokenizer) -> list:
    """Greedy completions of the first two held-out prompts of each task (for a human to read)."""
    exs = [e for exs in heldout.values() for e in exs[:2]]
    prompts = [[tok.bos_id, *tok.encode(e.prompt)] for e in exs]
    outs = greedy_generate(model, prompts, max_new_tokens=16, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [{"task": e.task, "prompt": e.prompt, "answer": e.answer, "completion": tok.decode(o)}
            for e, o in zip(exs, outs, strict=True)]


def _environment(device: torch.device | str, threads: int) -> dict:
    return {"device": str(device), "threads": threads, "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_count": os.cpu_count()}


def pretrain_hash(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig) -> str:
    """Hash of everything that determines the pretrained base (the cache key)."""
    blob = json.dumps({"model": model_cfg.to_dict(), "train": asdict(train_cfg),
                       "data": data_cfg.to_dict(), "version": _PRETRAIN_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_base(base_dir: str | os.PathLike, key: str) -> bool:
    """Whether ``base_dir`` already holds a complete base checkpoint with cache key ``key``."""
    cfg_path, weights = Path(base_dir) / "config.json", Path(base_dir) / "model.safetensors"
    if not (cfg_path.is_file() and weights.is_file()):
        return False
    try:
        return json.loads(cfg_path.read_text()).get("deltaspec_pretrain_hash") == key
    except (OSError, json.JSONDecodeError):
        return False


def pretrain(
    base_dir: str | os.PathLike,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
    quick: bool = False,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    log: Log | None = None,
) -> dict:
    """Pretrain the base LM on the plain-text corpus and save it to ``base_dir`` (cached).

    When ``base_dir`` already holds a base with the same config hash, it is reused and its
    ``metrics.json`` returned with ``"cached": True``.
    """
    mcfg = model_config or (quick_model_config() if quick else ModelConfig())
    tcfg = train_config or default_train_config("pretrain", quick, seed)
    dcfg = data_config or (quick_data_config(seed) if quick else DataConfig(seed=seed))
    key, base = pretrain_hash(mcfg, tcfg, dcfg), Path(base_dir)
    if cached_base(base, key):
        metrics_path = base / "metrics.json"
        cached = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        return {**cached, "cached": True, "path": str(base)}
    wall = time.perf_counter()
    with _threads(threads) as n_threads:
        torch.manual_seed(tcfg.seed)
        tok, mix = CharTokenizer(), build_mixture(dcfg)
        if tok.vocab_size != mcfg.vocab_size:
            raise ValueError(f"model vocab_size {mcfg.vocab_size} != tokenizer {tok.vocab_size}")
        n_val = max(1, len(mix.pretrain_lines) // 20)
        streams = [torch.tensor([t for line in lines for t in (tok.bos_id, *tok.encode(line),
                                 tok.eos_id)]) for lines in (mix.pretrain_lines[n_val:],
                                                             mix.pretrain_lines[:n_val])]
        model = DeltaspecReferenceLM(mcfg).to(device)
        if log:
            log(f"pretraining base ({sum(p.numel() for p in model.parameters())} params) -> {base}")
        stats = train_loop(model, list(model.parameters()),
                           lm_batches(streams[0], tcfg.batch_size, tcfg.seq_len, tcfg.seed, device),
                           tcfg, device, log=log)
        val_loss = _val_loss(model, streams[1], tcfg.seq_len, device)
        acc = evaluate_tasks(model, mix.heldout, _encoder(tok), tok.pad_id, device)
        config = full_config_dict(mcfg, {"deltaspec_pretrain_hash": key})
        save_full_checkpoint(model.cpu(), base, config)
    metrics = {"method": "base", "stage": "pretrain", "path": str(base), "cached": False,
               **stats, "val_loss": val_loss, **_accuracy_block(acc),
               "trainable_params": sum(p.numel() for p in model.parameters()),
               "total_params": sum(p.numel() for p in model.parameters()),
               "wall_time_s": time.perf_counter() - wall,
               "environment": _environment(device, n_threads),
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


def _prepare_model(
    method: str, base_dir: Path, adapter: AdapterConfig, device: str
) -> tuple[DeltaspecReferenceLM, dict, dict, list[nn.Parameter]]:
    """Load the base and make it trainable for ``method``: (model, base config, layers, params)."""
    model, base_config = load_full_checkpoint(base_dir)
    model = model.to(device)
    layers: dict = {}
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        r = adapter.lora_rank() if method == "lora" else adapter.r
        layers = apply_adapters(model, method, adapter.target_modules, r=r, n=adapter.n,
                                alpha=adapter.alpha, scaling_shape=adapter.scaling_shape)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, base_config, layers, params


def _formula_params(method: str, layers: dict, adapter: AdapterConfig) -> int | None:
    """Trainable parameters predicted by the closed-form formulas (None for full fine-tuning)."""
    if method == "lora":
        return sum(lora_num_params(m.base.in_features, m.base.out_features, m.r)
                   for m in layers.values())
    if method == "multilora":
        return sum(multilora_num_params(m.base.in_features, m.base.out_features, m.n, m.r,
                                        m.scaling_shape) for m in layers.values())
    return None


def _save_method(method: str, model: nn.Module, layers: dict, out: Path, base: Path,
                 adapter: AdapterConfig, base_config: dict) -> str:
    """Write the checkpoint of ``method`` into ``out``; return the format name."""
    targets = sorted({p.rpartition(".")[2] for p in layers})
    if method == "lora":
        save_peft_lora(layers, out, str(base), targets)
        return "peft-lora"
    if method == "multilora":
        save_multilora(layers, out, str(base), targets)
        return "multilora"
    config = {k: v for k, v in base_config.items() if k != "deltaspec_pretrain_hash"}
    save_full_checkpoint(model.cpu(), out, {**config, "deltaspec_finetuned_from": str(base)})
    return "hf-full"


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
) -> dict:
    """Fine-tune the base in ``base_dir`` on the task mixture with ``method`` and save to ``out_dir``.

    ``method`` is "lora" (PEFT-style adapter), "multilora" (MultiLoRA folder) or "full" (HF-style
    full checkpoint). ``data_config`` must be the one the base was pretrained with (the facts).
    Returns the metrics, also written to ``out_dir/metrics.json``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    adapter = adapter or AdapterConfig()
    tcfg = train_config or default_train_config(method, quick, seed)
    dcfg = data_config or (quick_data_config(seed) if quick else DataConfig(seed=seed))
    base, out = Path(base_dir).resolve(), Path(out_dir)
    wall = time.perf_counter()
    with _threads(threads) as n_threads:
        torch.manual_seed(tcfg.seed)
        tok, mix = CharTokenizer(), build_mixture(dcfg)
        encode = _encoder(tok)
        model, base_config, layers, params = _prepare_model(method, base, adapter, device)
        if log:
            log(f"fine-tuning {method}: {sum(p.numel() for p in params)} trainable params")
        train_enc = {t: [encode(e) for e in exs] for t, exs in mix.train.items()}
        batches = finetune_batches(train_enc, tcfg.batch_size, tcfg.seed, tok.pad_id, device)
        stats = train_loop(model, params, batches, tcfg, device, log=log)
        acc = evaluate_tasks(model, mix.heldout, encode, tok.pad_id, device)
        train_acc = evaluate_tasks(model, mix.train, encode, tok.pad_id, device, limit=64)
        samples = _samples(model, mix.heldout, tok)
        ckpt = _save_method(method, model, layers, out, base, adapter, base_config)
    base_metrics = base / "metrics.json"
    metrics = {
        "method": method, "stage": "finetune", "path": str(out), "base_path": str(base),
        "checkpoint_format": ckpt, **stats, **_accuracy_block(acc),
        **_accuracy_block(train_acc, "train_"),
        "base_accuracy": (json.loads(base_metrics.read_text()).get("accuracy")
                          if base_metrics.is_file() else None),
        "trainable_params": sum(p.numel() for p in params),
        "trainable_params_formula": _formula_params(method, layers, adapter),
        "total_params": sum(p.numel() for p in model.parameters()),
        "wall_time_s": time.perf_counter() - wall, "samples": samples,
        "environment": _environment(device, n_threads),
        "config": {"model": base_config, "train": asdict(tcfg), "data": dcfg.to_dict(),
                   "adapter": {**asdict(adapter), "lora_rank": adapter.lora_rank()}
                   if method != "full" else None},
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


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
    log: Log | None = None,
) -> dict[str, dict]:
    """Pretrain (or reuse) the base, then fine-tune every method of ``methods``.

    Writes ``out_dir/base`` and ``out_dir/<method>`` for each method and returns
    ``{"base": base metrics, "<method>": metrics, ...}``. With ``cache_dir``, the base is trained
    once into ``cache_dir/base-<hash>`` and copied into ``out_dir/base``.
    """
    out = Path(out_dir)
    mcfg = model_config or (quick_model_config() if quick else ModelConfig())
    dcfg = data_config or (quick_data_config(seed) if quick else DataConfig(seed=seed))
    pcfg = pretrain_config or default_train_config("pretrain", quick, seed)
    key = pretrain_hash(mcfg, pcfg, dcfg)
    base_dir = Path(cache_dir) / f"base-{key}" if cache_dir else out / "base"
    results = {"base": pretrain(base_dir, mcfg, pcfg, dcfg, seed=seed, device=device, log=log)}
    if cache_dir and not cached_base(out / "base", key):
        (out / "base").mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "metrics.json", "config.json"):  # config last
            tmp = out / "base" / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(base_dir / name, tmp)
            os.replace(tmp, out / "base" / name)
    for method in methods:
        tcfg = (finetune_configs or {}).get(method) or default_train_config(method, quick, seed)
        results[method] = finetune(method, out / "base", out / method, adapter, tcfg, dcfg,
                                   seed=seed, device=device, log=log)
    return results
