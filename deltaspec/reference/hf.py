"""Optional: the same LoRA / MultiLoRA / full fine-tuning applied to a local Hugging Face causal LM.

Needs ``transformers`` (imported lazily). The model is read with ``local_files_only=True`` (never
downloaded). Text is encoded with the folder's tokenizer when it has one; otherwise with the
reference character tokenizer, whose 80 ids must fit in the model's vocabulary. Checkpoints are
written in the same formats as the reference (PEFT-style LoRA, MultiLoRA, HF-style full) with the
HF model's own module names; ``base_model_name_or_path`` is the HF folder.

Note: the mixture's facts were never in this model's pretraining, so held-out recall measures
nothing but luck here; the other tasks are meaningful.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .configs import AdapterConfig, TrainConfig, resolve_finetune_configs
from .data import CharTokenizer, DataConfig, Example, build_mixture
from .evaluate import Encoder, evaluate_tasks, finetune_batches
from .export import save_multilora, save_peft_lora, write_json_atomic, write_safetensors_atomic
from .loop import Log, thread_limit, train_loop
from .train import _accuracy_block, _formula_params, make_trainable


class _LogitsOnly(nn.Module):
    """Wrap an HF causal LM so that calling it returns the logits tensor (B, T, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits of ``input_ids`` (B, T)."""
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def _load(hf_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer or None) from a local folder; ValueError when that is impossible."""
    try:
        import transformers
    except ImportError as exc:
        raise ValueError("--hf-model needs the transformers package (pip install transformers)") \
            from exc
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(hf_dir), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{hf_dir}: cannot load a causal LM: {first}") from exc
    tokenizer = None
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError):
        tokenizer = None
    return model, tokenizer


def _encoder(tokenizer: Any, vocab_size: int) -> tuple[Encoder, int]:
    """(Example → (ids, n_prompt), pad id) for the model's tokenizer or the char tokenizer."""
    if tokenizer is None:
        tok = CharTokenizer()
        if tok.vocab_size > vocab_size:
            raise ValueError(f"the model's vocabulary ({vocab_size}) is smaller than the reference "
                             f"character vocabulary ({tok.vocab_size}) and it has no tokenizer")

        def encode_chars(ex: Example) -> tuple[list[int], int]:
            prompt = [tok.bos_id, *tok.encode(ex.prompt)]
            return [*prompt, *tok.encode(ex.answer), tok.eos_id], len(prompt)

        return encode_chars, tok.pad_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the model's tokenizer has no eos token")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos

    def encode_tok(ex: Example) -> tuple[list[int], int]:
        prompt = bos + tokenizer.encode(ex.prompt, add_special_tokens=False)
        answer = tokenizer.encode(ex.answer, add_special_tokens=False)
        return [*prompt, *answer, eos], len(prompt)

    return encode_tok, pad


def _save_full_hf(model: Any, out: Path) -> None:
    """HF-style folder: model.safetensors (tied lm_head dropped, as HF does) + config.json."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    write_safetensors_atomic(out / "model.safetensors", state)
    write_json_atomic(out / "config.json", model.config.to_dict())


def _save(method: str, model: Any, layers: dict, out: Path, hf: Path) -> None:
    """Write the checkpoint of ``method`` with the HF model's module names."""
    targets = sorted({p.rpartition(".")[2] for p in layers})
    if method == "lora":
        save_peft_lora(layers, out, str(hf), targets)
    elif method == "multilora":
        save_multilora(layers, out, str(hf), targets)
    else:
        _save_full_hf(model.cpu(), out)


def finetune_hf(
    method: str,
    hf_dir: str | os.PathLike,
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
    """Fine-tune the HF causal LM in ``hf_dir`` on the mixture; write checkpoint + metrics.json."""
    adapter, tcfg, dcfg = resolve_finetune_configs(method, quick, seed, adapter, train_config,
                                                   data_config)
    hf, out = Path(hf_dir).resolve(), Path(out_dir)
    wall = time.perf_counter()
    with thread_limit(threads) as n_threads:
        torch.manual_seed(tcfg.seed)
        model, tokenizer = _load(hf)
        model = model.to(device)
        encode, pad = _encoder(tokenizer, model.config.vocab_size)
        mix, wrapped = build_mixture(dcfg), _LogitsOnly(model)
        base_acc = evaluate_tasks(wrapped, mix.heldout, encode, pad, device)
        layers, params = make_trainable(model, method, adapter)
        train_enc = {t: [encode(e) for e in exs] for t, exs in mix.train.items()}
        batches = finetune_batches(train_enc, tcfg.batch_size, tcfg.seed, pad, device)
        stats = train_loop(wrapped, params, batches, tcfg, device, log=log)
        acc = evaluate_tasks(wrapped, mix.heldout, encode, pad, device)
        _save(method, model, layers, out, hf)
    metrics = {
        "method": method, "stage": "finetune", "path": str(out), "base_path": str(hf),
        "checkpoint_format": {"lora": "peft-lora", "multilora": "multilora"}.get(method, "hf-full"),
        "tokenizer": "model" if tokenizer is not None else "reference-char",
        **stats, **_accuracy_block(acc, data=dcfg), "base_accuracy": base_acc,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_params_formula": _formula_params(method, layers),
        "total_params": sum(p.numel() for p in model.parameters()),
        "wall_time_s": time.perf_counter() - wall,
        "environment": {"device": device, "threads": n_threads, "torch": torch.__version__},
        "config": {"model": model.config.to_dict(), "train": asdict(tcfg), "data": dcfg.to_dict(),
                   "adapter": None if method == "full" else
                   {**asdict(adapter), "lora_rank": adapter.lora_rank()}},
    }
    write_json_atomic(out / "metrics.json", metrics)
    return metrics
