"""The bundled MultiLoRA training reference (standalone: imports nothing else of deltaspec).

A nanoGPT-sized, Llama-shaped causal LM (:mod:`.model`), LoRA and MultiLoRA layers
(:mod:`.layers`), a seeded synthetic multi-task mixture (:mod:`.data`), pretraining and
LoRA / MultiLoRA / full fine-tuning (:mod:`.train`) and checkpoint writers (:mod:`.export`)::

    from deltaspec.reference import run_all
    metrics = run_all("out", quick=True)   # out/base, out/lora, out/multilora, out/full
"""

from .configs import (
    ALL_LINEAR,
    METHODS,
    AdapterConfig,
    TrainConfig,
    default_train_config,
    quick_data_config,
    quick_model_config,
)
from .data import (
    TASK_FAMILIES,
    TASKS,
    CharTokenizer,
    DataConfig,
    Example,
    build_mixture,
    chance_accuracy,
)
from .export import load_full_checkpoint, save_full_checkpoint, save_multilora, save_peft_lora
from .hf import finetune_hf
from .layers import (
    LoRALinear,
    MultiLoRALinear,
    apply_adapters,
    lora_num_params,
    merge_adapters,
    multilora_num_params,
)
from .model import DeltaspecReferenceLM, ModelConfig, greedy_generate
from .train import finetune, pretrain, run_all

__all__ = [
    "ALL_LINEAR",
    "AdapterConfig",
    "CharTokenizer",
    "DataConfig",
    "DeltaspecReferenceLM",
    "Example",
    "LoRALinear",
    "METHODS",
    "ModelConfig",
    "MultiLoRALinear",
    "TASKS",
    "TASK_FAMILIES",
    "TrainConfig",
    "apply_adapters",
    "build_mixture",
    "chance_accuracy",
    "default_train_config",
    "finetune",
    "finetune_hf",
    "greedy_generate",
    "load_full_checkpoint",
    "lora_num_params",
    "merge_adapters",
    "multilora_num_params",
    "pretrain",
    "quick_data_config",
    "quick_model_config",
    "run_all",
    "save_full_checkpoint",
    "save_multilora",
    "save_peft_lora",
]
