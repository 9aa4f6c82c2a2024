"""The bundled MultiLoRA training reference (standalone: imports nothing else of deltaspec).

A nanoGPT-sized, Llama-shaped causal LM (:mod:`.model`), LoRA and MultiLoRA layers
(:mod:`.layers`), a seeded synthetic multi-task mixture (:mod:`.data`), pretraining and
LoRA / MultiLoRA / full fine-tuning (:mod:`.train`) and checkpoint writers (:mod:`.export`)::

    from deltaspec.reference import run_all
    metrics = run_all("out", quick=True)   # out/base, out/lora, out/multilora, out/full
"""

from .data import TASK_FAMILIES, TASKS, CharTokenizer, DataConfig, Example, build_mixture
from .export import save_full_checkpoint, save_multilora, save_peft_lora
from .layers import (
    LoRALinear,
    MultiLoRALinear,
    apply_adapters,
    lora_num_params,
    merge_adapters,
    multilora_num_params,
)
from .model import DeltaspecReferenceLM, ModelConfig, greedy_generate
from .train import (
    METHODS,
    AdapterConfig,
    TrainConfig,
    default_train_config,
    finetune,
    pretrain,
    run_all,
)

__all__ = [
    "METHODS",
    "TASKS",
    "TASK_FAMILIES",
    "AdapterConfig",
    "CharTokenizer",
    "DataConfig",
    "DeltaspecReferenceLM",
    "Example",
    "LoRALinear",
    "ModelConfig",
    "MultiLoRALinear",
    "TrainConfig",
    "apply_adapters",
    "build_mixture",
    "default_train_config",
    "finetune",
    "greedy_generate",
    "lora_num_params",
    "merge_adapters",
    "multilora_num_params",
    "pretrain",
    "run_all",
    "save_full_checkpoint",
    "save_multilora",
    "save_peft_lora",
]
