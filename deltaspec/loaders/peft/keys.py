"""The tensor names of a PEFT LoRA adapter, sorted by role: each adapted module's parts
(``lora_A``, ``lora_B``, ``lora_B.bias``, embedding factors, DoRA's magnitude), saved base layers,
full weights (``modules_to_save``) and trainable-token deltas. No torch here: the LoRA loader
(:mod:`deltaspec.loaders.peft.lora`) and the plan's header check (:mod:`deltaspec.plan`) read
an adapter's keys through this one grouping, and so does every other PEFT method
(with its own part names: :func:`group`'s ``parts``).

>>> g = group(["base_model.model.l.q.lora_A.weight", "base_model.model.l.q.lora_B.weight",
...            "base_model.model.head.weight", "other"])
>>> sorted(g.lora["l.q"].keys), list(g.full), g.other
(['lora_A', 'lora_B'], ['head'], ['other'])
>>> group(["base_model.model.l.q.ia3_l"], parts=("ia3_l",)).modules["l.q"].keys
{'ia3_l': 'base_model.model.l.q.ia3_l'}
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from deltaspec.names import strip_peft_prefix

LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
BIAS_PARTS = ("lora_B",)  # parts whose ``.bias`` is a part of its own (``lora_B.bias``)
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

    modules: dict[str, Module] = field(default_factory=dict)  # each adapted module's parts
    base_layer: dict[str, dict[str, str]] = field(default_factory=dict)  # module → leaf → key
    full: dict[str, dict[str, str]] = field(default_factory=dict)  # modules_to_save
    tokens: dict[str, str] = field(default_factory=dict)  # module → trainable_tokens_delta key
    shared: dict[str, str] = field(default_factory=dict)  # part → key of a model-level tensor
    other: list[str] = field(default_factory=list)

    def parts(self) -> list[tuple[str, dict[str, str]]]:
        """(module, part → key) of every adapted module."""
        return [(name, mod.keys) for name, mod in self.modules.items()]

    @property
    def lora(self) -> dict[str, Module]:
        """The adapted modules (the name LoRA's readers use)."""
        return self.modules


def part_pattern(parts: tuple[str, ...]) -> re.Pattern[str]:
    """``<module>.<part>[.<adapter name>][.weight|.bias]`` for the part names ``parts``."""
    alt = "|".join(re.escape(p) for p in sorted(parts, key=len, reverse=True))
    return re.compile(rf"^(?P<mod>.+?)\.(?P<part>{alt})"
                      r"(?:\.(?!(?:weight|bias)$)[^.]+)?(?:\.(?P<leaf>weight|bias))?$")


def group(keys: Iterable[str], parts: tuple[str, ...] = LORA_PARTS,
          shared: tuple[str, ...] = ()) -> Groups:
    """Sort an adapter's tensor names by role (names with or without PEFT's prefix): each adapted
    module's ``parts`` (LoRA's by default), model-level ``base_model.<name>`` tensors named in
    ``shared`` (VeRA's projections), trainable tokens, base layers, full weights, the rest."""
    g, part_re = Groups(), part_pattern(parts)
    for key in keys:
        name = strip_peft_prefix(key)
        head = key.removeprefix("base_model.").split(".")[0]
        if head in shared and key.count(".") <= 2:
            g.shared[head] = key
        elif (m := part_re.match(name)) and (m["leaf"] != "bias" or m["part"] in BIAS_PARTS):
            mod = g.modules.setdefault(m["mod"], Module(m["mod"]))
            mod.keys[m["part"] + (".bias" if m["leaf"] == "bias" else "")] = key
        elif m := _TOKENS.match(name):
            g.tokens[m["mod"]] = key
        elif m := _FULL.match(name):
            target = g.base_layer if m["base"] else g.full
            target.setdefault(m["mod"], {})[m["leaf"]] = key
        else:
            g.other.append(key)
    return g
