"""Genuine checkpoints for tests, made with transformers + peft from tiny random configs.

Every builder is deterministic (seeded) and writes real files the way users' tools write them.
``expected_deltas`` is the oracle: PEFT's own ``merge_and_unload()`` minus the base weights,
canonicalised to (out, in).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

CONV1D_KINDS = ("c_attn", "c_proj", "c_fc")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def save_model(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    return folder


def full_finetune(model, folder: Path, seed: int = 1, rank: int | None = None, **kw) -> Path:
    """A 'fine-tuned' copy: every 2-D weight gets a random update (low-rank if ``rank``)."""
    g = torch.Generator().manual_seed(seed)
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim != 2 or "wpe" in name:
                continue
            m, n = p.shape
            if rank is None:
                p.add_(0.02 * torch.randn(m, n, generator=g))
            else:
                p.add_(0.05 * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g))
    ft.save_pretrained(folder, **kw)
    return folder


def lora_adapter(model, folder: Path, seed: int = 2, **lora_kw):
    """A PEFT adapter with non-zero B (init_lora_weights=False gives random A and B).

    Returns (adapter folder, the PeftModel) so that tests can merge it as the oracle.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lora_kw.setdefault("init_lora_weights", False)
    cfg = LoraConfig(**lora_kw)
    pm = get_peft_model(copy.deepcopy(model), cfg)
    pm.save_pretrained(folder)
    return folder, pm


def expected_deltas(base_model, peft_model) -> dict[str, torch.Tensor]:
    """PEFT's merge minus the base, per module, canonical (out, in), float64; zero ones dropped."""
    base_sd = {k: v.detach().to(torch.float64) for k, v in base_model.state_dict().items()}
    merged = copy.deepcopy(peft_model).merge_and_unload()
    out = {}
    for key, w in merged.state_dict().items():
        if key not in base_sd or w.ndim < 2:
            continue
        d = w.detach().to(torch.float64) - base_sd[key]
        if not bool(d.any()):
            continue
        name = key.removesuffix(".weight")
        if name.rsplit(".", 1)[-1] in CONV1D_KINDS and "gpt2" in type(base_model).__name__.lower():
            d = d.T
        out[name] = d.reshape(d.shape[0], -1)
    return out
