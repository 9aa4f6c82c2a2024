"""The tensor names of a PEFT LoRA adapter, sorted by role: each adapted module's parts
(``lora_A``, ``lora_B``, ``lora_B.bias``, embedding factors, DoRA's magnitude), saved base layers,
full weights (``modules_to_save``) and trainable-token deltas. No torch here: the LoRA loader
(:mod:`deltaspec.loaders.peft.lora`) and the torch-free CLI route (:mod:`deltaspec.lite`) read
an adapter's keys through this one grouping.

>>> g = group(["base_model.model.l.q.lora_A.weight", "base_model.model.l.q.lora_B.weight",
...            "base_model.model.head.weight", "other"])
>>> sorted(g.lora["l.q"].keys), list(g.full), g.other
(['lora_A', 'lora_B'], ['head'], ['other'])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from deltaspec.names import strip_peft_prefix

_PART = re.compile(
    r"^(?P<mod>.+?)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)[^.]+)?(?:\.(?P<leaf>weight|bias))?$"
)
_TOKENS = re.compile(r"^(?P<mod>.+?)\.token_adapter\.trainable_tokens_delta(?:\.[^.]+)?$")
_FULL = re.compile(r"^(?P<mod>.+?)(?P<base>\.base_layer)?\.(?P<leaf>weight|bias)$")


@dataclass
class Module:
    """The tensors of one adapted module, by part name (``lora_A``, ``lora_B.bias``, …)."""

    name: str
    keys: dict[str, str] = field(default_factory=dict)


@dataclass
class Groups:
    """An adapter's keys sorted by role."""

    lora: dict[str, Module] = field(default_factory=dict)
    base_layer: dict[str, dict[str, str]] = field(default_factory=dict)  # module → leaf → key
    full: dict[str, dict[str, str]] = field(default_factory=dict)  # modules_to_save
    tokens: dict[str, str] = field(default_factory=dict)  # module → trainable_tokens_delta key
    other: list[str] = field(default_factory=list)


def group(keys: list[str]) -> Groups:
    """Sort an adapter's tensor names by role (names with or without PEFT's prefix)."""
    g = Groups()
    for key in keys:
        name = strip_peft_prefix(key)
        if m := _PART.match(name):
            mod = g.lora.setdefault(m["mod"], Module(m["mod"]))
            mod.keys[m["part"] + (".bias" if m["leaf"] == "bias" else "")] = key
        elif m := _TOKENS.match(name):
            g.tokens[m["mod"]] = key
        elif m := _FULL.match(name):
            target = g.base_layer if m["base"] else g.full
            target.setdefault(m["mod"], {})[m["leaf"]] = key
        else:
            g.other.append(key)
    return g
