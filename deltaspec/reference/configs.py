"""Configurations of the training runs, with the tuned defaults and the ``quick`` presets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .data import DataConfig
from .layers import MULTILORA_INITS, SCALING_SHAPES
from .model import ModelConfig

METHODS = ("lora", "multilora", "full")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PRETRAIN_VERSION = 2  # bump when pretraining code changes what a cached base would contain


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule of one training run (pretraining or one fine-tune)."""

    # Optimiser steps: the main knob of the time budget (see default_train_config).
    steps: int = 300
    # Sequences per step: 32 keeps 2 CPU cores busy without slowing each step much.
    batch_size: int = 32
    # Peak learning rate; the per-method defaults come from a small grid (default_train_config).
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
    # Window length of pretraining batches: ~1.5 corpus lines; 64 costs 20% less per step than 96
    # for the same base quality here (fine-tuning batches hold whole examples instead).
    seq_len: int = 64
    # Seed of initialisation and batch order.
    seed: int = 0
    # Early stopping (fine-tuning only): evaluate the held-out (validation) loss every
    # ``eval_every`` steps (0 = never), stop after ``patience`` evaluations without an
    # improvement larger than ``min_delta`` (0 = never stop), end on the best parameters.
    eval_every: int = 0
    patience: int = 0
    min_delta: float = 0.0
    # Reduce on plateau: when patience runs out, multiply the learning rate by ``lr_drop_factor``
    # and go on, up to ``lr_drops`` times, before stopping (0 = stop at the first plateau). With
    # a constant schedule (min_lr_ratio = 1) this trains until the loss stops improving at the
    # lowest rate, without a cosine horizon that decides the end by itself.
    lr_drops: int = 0
    lr_drop_factor: float = 0.2

    def __post_init__(self) -> None:
        if self.lr_drops < 0 or not 0 < self.lr_drop_factor <= 1:
            raise ValueError(f"lr_drops must be >= 0 and lr_drop_factor in (0, 1], not "
                             f"{self.lr_drops} and {self.lr_drop_factor}")


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
    # MultiLoRA initialisation: "multilora" (the paper: A and B Kaiming-uniform, scalings zero)
    # or "lora" (A Kaiming-uniform, B zero, scalings one: LoRA's init in MultiLoRA's shape).
    init: str = "multilora"

    def __post_init__(self) -> None:
        if self.n < 1 or self.r < 1:
            raise ValueError(f"n and r must be >= 1 (got n={self.n}, r={self.r})")
        if self.scaling_shape not in SCALING_SHAPES:
            raise ValueError(f"scaling_shape must be one of {SCALING_SHAPES}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0 (got {self.alpha})")
        if self.init not in MULTILORA_INITS:
            raise ValueError(f"init must be one of {MULTILORA_INITS}")
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
    """Tuned defaults for ``stage`` in {"pretrain", "lora", "multilora", "full"}.

    Learning rates were picked per method from a small grid, 600 steps each, on the default base
    (mean held-out exact match over the 7 tasks): full FT 1e-3 → 0.78, 2e-3 → 0.83; LoRA (rank
    16) 3e-3 → 0.50, 1e-2 → 0.52; MultiLoRA (4 × rank 4) 3e-3 → 0.30, 1e-2 → 0.63, 2e-2 → 0.71.
    MultiLoRA needs the highest rate: its scalings start at zero, so ΔW grows only as fast as
    they do. Adapters get no weight decay (their ΔW is small already); full FT a little.
    """
    table = {  # stage: (steps, quick steps, lr, warmup, weight decay)
        "pretrain": (600, 300, 3e-3, 50, 0.01),
        "lora": (500, 150, 1e-2, 50, 0.0),
        "multilora": (500, 150, 2e-2, 50, 0.0),
        "full": (500, 150, 2e-3, 50, 0.01),
    }
    if stage not in table:
        raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(table)}")
    steps, qsteps, lr, warm, wd = table[stage]
    steps = qsteps if quick else steps
    return TrainConfig(steps=steps, lr=lr, warmup_steps=min(warm, steps // 10),
                       weight_decay=wd, seed=seed)


def quick_data_config(seed: int = 0) -> DataConfig:
    """Smaller data for quick runs (fewer pretraining lines and held-out examples)."""
    return DataConfig(seed=seed, n_pretrain_lines=3000, n_train_per_task=400, n_heldout_per_task=32)


def resolve_base_configs(
    quick: bool = False,
    seed: int = 0,
    model_config: ModelConfig | None = None,
    pretrain_config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    """Fill in the defaults (or quick presets) of the three configs that determine the base."""
    return (
        model_config or (quick_model_config() if quick else ModelConfig()),
        pretrain_config or default_train_config("pretrain", quick, seed),
        data_config or (quick_data_config(seed) if quick else DataConfig(seed=seed)),
    )


def resolve_finetune_configs(
    method: str,
    quick: bool = False,
    seed: int = 0,
    adapter: AdapterConfig | None = None,
    train_config: TrainConfig | None = None,
    data_config: DataConfig | None = None,
) -> tuple[AdapterConfig, TrainConfig, DataConfig]:
    """Check ``method`` and fill in the defaults (or quick presets) of a fine-tuning run."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return (
        adapter or AdapterConfig(),
        train_config or default_train_config(method, quick, seed),
        data_config or (quick_data_config(seed) if quick else DataConfig(seed=seed)),
    )


def pretrain_hash(model_cfg: ModelConfig, train_cfg: TrainConfig, data_cfg: DataConfig,
                  threads: int | None = None, device: str = "cpu") -> str:
    """Hash of everything that determines the pretrained base (the cache key): the configs, and
    the thread count, device and CPU model it is trained with (the thread count splits float
    reductions and the CPU decides their vector kernels, so either changes the weights)."""
    from .machine import cpu_name, default_threads

    blob = json.dumps({"model": model_cfg.to_dict(), "train": asdict(train_cfg),
                       "data": data_cfg.to_dict(), "version": _PRETRAIN_VERSION,
                       "threads": threads or default_threads(), "device": str(device),
                       "cpu": cpu_name()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
