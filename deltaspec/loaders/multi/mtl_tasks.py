"""What the MTL-LoRA code base's variants share (the context, a read-once cache) and MoELoRA.

MoELoRA (``MMOELoraLinear``) keys of module ``<m>``, E experts of rank r/E each::

    <m>.lora_A.loraA.{i}.mlp.weight (r/E, in)   <m>.lora_B.loraB.{i}.mlp.weight (out, r/E)
    <m>.lora_gate.GateL.weight (E, d)           <m>.lora_task_embedding.weight (T + 1, d)

(each expert's weight is also saved as ``….{i}.weight``, the same tensor). The gate depends on the
task only, so each task's update is a static ΔW_t = Σᵢ g_t,i·Bᵢ·Aᵢ·α/r with
g_t = softmax(GateL·emb_t); tasks t = 0 … T − 1 are reported (the embedding's extra row T is not
indexed by the code base's task ids).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.store import TensorStore
from deltaspec.names import indexed

T = TypeVar("T")
_EXPERT = re.compile(r"^lora_(?P<side>A|B)\.lora(?P=side)\.(?P<i>\d+)\.(?P<mlp>mlp\.)?weight$")
GATE, EMBEDDING = "lora_gate.GateL.weight", "lora_task_embedding.weight"
DEFAULT_TEMPERATURE = 1.0  # mlora_finetune.py's --temperature default (its scripts pass 0.1)


@dataclass
class MtlCheckpoint:
    """What every variant builder needs; ``uses`` collects the unsaved settings the rows rely on."""

    store: TensorStore
    source: str
    base: Checkpoint | None
    alpha: float | None
    temperature: float | None
    uses: set[str] = field(default_factory=set)

    def scale(self, r: int) -> float:
        """α/r, or 1 when α was not given (noted); a rank below 1 is refused."""
        if r < 1:
            raise CheckpointError(f"{self.source}: a module of rank {r}; every adapter module "
                                  "needs rank ≥ 1")
        if self.alpha is None:
            self.uses.add("alpha")
            return 1.0
        return self.alpha / r

    def tau(self) -> float:
        """The MTL-LoRA softmax temperature (the code base's default when not given; noted)."""
        if self.temperature is None:
            self.uses.add("temperature")
            return DEFAULT_TEMPERATURE
        return self.temperature

    def get(self, key: str) -> torch.Tensor:
        """One tensor as float32."""
        return self.store.get(key).to(torch.float32)

    def shape(self, keys: dict[str, str], part: str, ndim: int, mod: str) -> tuple[int, ...]:
        """The shape of ``<mod>.<part>``, which must exist and have ``ndim`` dimensions."""
        if part not in keys:
            raise CheckpointError(f"{self.source}: module {mod!r} has no {part} tensor")
        shape = self.store.shape(keys[part])
        if len(shape) != ndim:
            raise CheckpointError(f"{self.source}: tensor {keys[part]!r} has shape {shape}; "
                                  f"expected {ndim} dimensions")
        return shape

    def base_weight(self, mod: str, shape: tuple[int, int]) -> Callable[[], torch.Tensor] | None:
        """The base weight of ``mod`` as (out, in), when a base was given."""
        return self.base.oriented(mod, shape) if self.base is not None else None


class Once(Generic[T]):
    """A thunk evaluated on first call and remembered (the tensors shared by a module's tasks)."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn: Callable[[], T] | None = fn
        self._value: T | None = None

    def __call__(self) -> T:
        if self._fn is not None:
            self._value, self._fn = self._fn(), None
        return self._value  # type: ignore[return-value]


def is_moelora(parts: set[str]) -> bool:
    """True for a module saved by ``MMOELoraLinear``."""
    return GATE in parts or EMBEDDING in parts or any(_EXPERT.match(p) for p in parts)


def _experts(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, dict[int, str]]:
    """side (A/B) → expert index → key (the ``mlp.weight`` copy preferred)."""
    found: dict[str, dict[int, str]] = {"A": {}, "B": {}}
    for part, key in sorted(keys.items(), key=lambda kv: "mlp." in kv[0]):
        m = _EXPERT.match(part)
        if m is not None:
            found[m["side"]][int(m["i"])] = key
        elif part not in (GATE, EMBEDDING):
            raise CheckpointError(f"{ctx.source}: tensor {key!r} is not part of a MoELoRA layer")
    n = len(found["A"])
    if n == 0 or set(found["A"]) != set(range(n)) or set(found["B"]) != set(range(n)):
        raise CheckpointError(f"{ctx.source}: {mod}: MoELoRA experts lora_A.loraA.{{i}} and "
                              f"lora_B.loraB.{{i}} must both run over 0…E−1 (found "
                              f"A {sorted(found['A'])}, B {sorted(found['B'])})")
    return found


def moelora(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, Delta]:
    """One factored ΔW_t = [g_t,1·B₁|…]·[A₁;…]·α/r per task t."""
    found = _experts(ctx, mod, keys)
    n = len(found["A"])
    shapes = [(ctx.store.shape(found["B"][i]), ctx.store.shape(found["A"][i])) for i in range(n)]
    d_out, d_in = shapes[0][0][0], shapes[0][1][-1]
    for (b, a), i in zip(shapes, range(n), strict=True):
        if len(a) != 2 or len(b) != 2 or b[1] != a[0] or (b[0], a[1]) != (d_out, d_in):
            raise CheckpointError(f"{ctx.source}: {mod}: expert {i} has lora_B {b} and lora_A {a}; "
                                  f"expected (out, r/E) and (r/E, in) with out={d_out}, in={d_in}")
    gate = ctx.shape(keys, GATE, 2, mod)
    emb = ctx.shape(keys, EMBEDDING, 2, mod)
    if gate != (n, emb[1]) or emb[0] < 2:
        raise CheckpointError(f"{ctx.source}: {mod}: {GATE} {gate} and {EMBEDDING} {emb} do not "
                              f"fit {n} experts ((E, d) and (T + 1, d))")
    rank = sum(a[0] for _, a in shapes)
    s = ctx.scale(rank)

    def factors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate weights (T+1, E), [B₁|…|B_E]·s, [A₁;…;A_E])."""
        g = torch.softmax(ctx.get(keys[EMBEDDING]).double() @ ctx.get(keys[GATE]).double().T, dim=1)
        b = torch.cat([ctx.get(found["B"][i]) for i in range(n)], dim=1) * s
        a = torch.cat([ctx.get(found["A"][i]) for i in range(n)], dim=0)
        return g, b, a

    cache = Once(factors)
    widths = torch.tensor([a[0] for _, a in shapes])
    out = {}
    for t in range(emb[0] - 1):
        def load(t: int = t) -> _delta.Factors:
            g, b, a = cache()
            return b * torch.repeat_interleave(g[t], widths).to(torch.float32), a

        name = indexed(mod, "tasks", t)
        out[name] = _delta.factored(name, (d_out, d_in), load, method="moelora",
                                    source=ctx.source, rank=rank,
                                    base=ctx.base_weight(mod, (d_out, d_in)))
    return out
