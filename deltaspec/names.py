"""Module names: canonical paths, the keys used to pair two checkpoints, layer index and kind."""

from __future__ import annotations

import re
from collections.abc import Iterable

PEFT_PREFIX = "base_model.model."
# Prefixes that differ between a bare model and the same model with a head (LlamaModel vs
# LlamaForCausalLM, GPT2Model vs GPT2LMHeadModel): stripped before two checkpoints are paired.
DRIFT_PREFIXES = ("model.", "transformer.", "gpt_neox.", "decoder.")

# Architectures whose linear layers are GPT-2 ``Conv1D`` (weights stored as (in, out)).
CONV1D_MODULES: dict[str, frozenset[str]] = {
    "gpt2": frozenset({"c_attn", "c_proj", "c_fc", "q_attn"}),
    "openai-gpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "imagegpt": frozenset({"c_attn", "c_proj", "c_fc"}),
    "decision_transformer": frozenset({"c_attn", "c_proj", "c_fc"}),
}

_LAYER = re.compile(r"\.(\d+)(?:\.|$)")
# Key shapes that identify an architecture when a folder has no config.json (GPT-2's blocks).
_SIGNATURES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:^|\.)h\.\d+\.attn\.c_attn\.weight$"), "gpt2"),
)


MAX_NAME = 1024  # characters of a name read from a file (tensor or shard; real ones are < 200)

def strip_peft_prefix(key: str) -> str:
    """``base_model.model.model.layers.0…`` → ``model.layers.0…``."""
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def match_key(name: str) -> str:
    """The key two checkpoints are paired by: the name without PEFT's and one drift prefix.

    >>> match_key("base_model.model.model.layers.0.self_attn.q_proj")
    'layers.0.self_attn.q_proj'
    >>> match_key("transformer.h.0.attn.c_attn")
    'h.0.attn.c_attn'
    """
    name = strip_peft_prefix(name)
    for prefix in DRIFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def layer_of(name: str) -> int | None:
    """The first integer path component (the block index), or None.

    >>> layer_of("model.layers.11.mlp.up_proj")
    11
    """
    m = _LAYER.search("." + name)
    return int(m.group(1)) if m else None


def kind_of(name: str) -> str:
    """The last path component, e.g. ``q_proj``.

    >>> kind_of("model.layers.0.self_attn.q_proj")
    'q_proj'
    """
    return name.rsplit(".", 1)[-1]


def module_order(name: str) -> tuple[tuple[int, int, str], ...]:
    """The sort key of module paths: numbers compared as numbers (layers.2 before layers.10).

    >>> sorted(["l.10.q", "l.2.q", "l.2.k"], key=module_order)
    ['l.2.k', 'l.2.q', 'l.10.q']
    """
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def indexed(module: str, group: str, index: int) -> str:
    """The row name of one of several updates of ``module`` (one per task, one per expert):
    ``<parent>.<group>.<index>.<kind>``, so that :func:`layer_of` and :func:`kind_of` still give
    the module's layer and kind.

    >>> indexed("model.layers.3.self_attn.q_proj", "tasks", 1)
    'model.layers.3.self_attn.tasks.1.q_proj'
    >>> layer_of(indexed("model.layers.3.mlp.up_proj", "experts", 7)), kind_of("x.experts.7.up_proj")
    (3, 'up_proj')
    """
    parent, _, kind = module.rpartition(".")
    return f"{parent}.{group}.{index}.{kind}" if parent else f"{group}.{index}.{kind}"


def is_conv1d(model_type: str | None, name: str) -> bool:
    """True when ``name`` is a GPT-2-style Conv1D module (stored (in, out)) of ``model_type``.

    ``name`` may end in ``.weight``.

    >>> is_conv1d("gpt2", "transformer.h.0.attn.c_attn.weight"), is_conv1d("llama", "q_proj")
    (True, False)
    """
    return kind_of(name.removesuffix(".weight")) in CONV1D_MODULES.get(model_type or "", frozenset())


def has_conv1d(model_type: str | None) -> bool:
    """True when ``model_type`` is an architecture of the Conv1D table."""
    return (model_type or "") in CONV1D_MODULES


def guess_model_type(keys: list[str]) -> str | None:
    """The model type a state dict's key names betray (only for Conv1D architectures), or None.

    Used when a checkpoint folder has no ``config.json``.

    >>> guess_model_type(["transformer.h.0.attn.c_attn.weight"]), guess_model_type(["layers.0.q"])
    ('gpt2', None)
    """
    for pattern, model_type in _SIGNATURES:
        if any(pattern.search(k) for k in keys):
            return model_type
    return None


# Architecture order of module kinds (attention, then MLP); unknown kinds follow, sorted.
KIND_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "query", "key", "value",
    "c_attn", "q_attn", "out_proj", "dense", "attn.c_proj", "gate_proj", "up_proj", "down_proj",
    "gate_up_proj", "w1", "w3", "w2", "fc1", "fc2", "c_fc", "c_proj", "dense_h_to_4h",
    "dense_4h_to_h", "embed_tokens", "wte", "lm_head",
)


def kind_order(kinds: Iterable[str]) -> list[str]:
    """``kinds`` in architecture order (q, k, v, o, gate, up, down, …), unknown ones sorted after."""
    rank = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(set(kinds), key=lambda k: (rank.get(k, len(rank)), k))
