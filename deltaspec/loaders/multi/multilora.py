"""MultiLoRA checkpoints: n parallel LoRA modules with learnable scalings, an exact factored delta.

ΔW = Σᵢ sᵢ·Bᵢ·Aᵢ·(α/r) = [s₁B₁ | … | sₙBₙ]·[A₁; …; Aₙ]·(α/r), rank ≤ n·r. Stacked tensors
``<module>.lora_A`` (n, r, in), ``.lora_B`` (n, out, r), ``.lora_scaling`` (n,) or (n, out), and a
JSON config (``multilora_config.json``: α, r, n). The MTL-LoRA re-implementation's keys (the same
names, optionally with PEFT's ``base_model.model.`` prefix and a ``.weight`` leaf) read the same way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ConfigError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source, folder_of
from deltaspec.loaders.store import TensorStore, read_json
from deltaspec.names import strip_peft_prefix
from deltaspec.options import Options

CONFIG = "multilora_config.json"
WEIGHTS = "multilora_model.safetensors"
SCHEMA: schema.Schema = {
    "lora_alpha": schema.Key("number"),
    "alpha": schema.Key("number"),
    "r": schema.Key("int", 1, schema.MAX_RANK, required=True),
    "n": schema.Key("int", 1, schema.MAX_COUNT),
}
_KEY = re.compile(r"^(?P<mod>.+)\.lora_(?P<part>A|B|scaling)(?:\.weight)?$")


def detect(folder: Source) -> bool:
    """True for a folder with ``multilora_config.json``."""
    return isinstance(folder, Path) and (folder / CONFIG).is_file()


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's factored ΔW in a MultiLoRA folder."""
    folder = folder_of(folder, "MultiLoRA checkpoints")
    config = read_json(folder / CONFIG)
    schema.check(config, SCHEMA, folder / CONFIG)
    alpha, r = config.get("lora_alpha", config.get("alpha")), config.get("r")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not isinstance(r, int) \
            or isinstance(r, bool) or r <= 0:
        raise ConfigError(f"{folder / CONFIG}: needs numeric 'lora_alpha' and a positive integer 'r'")
    n = config.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n <= 0):
        raise ConfigError(f"{folder / CONFIG}: 'n' must be a positive integer, not {n!r}")
    files = [folder / WEIGHTS] if (folder / WEIGHTS).is_file() else \
        sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{folder}: no {WEIGHTS}")
    store = TensorStore.from_files(files)
    parts: dict[str, dict[str, str]] = {}
    for key in store:
        m = _KEY.match(strip_peft_prefix(key))
        if m is None:
            skipped.append((key, "not a MultiLoRA tensor"))
            continue
        parts.setdefault(m["mod"], {})[m["part"]] = key
    out = {}
    for mod, keys in parts.items():
        d = stacked_delta(store, mod, keys, alpha / r, base)  # checks that lora_A/B/scaling are there
        stacked_n, stacked_r = _stacked(store, keys)
        if stacked_r != r or (n is not None and stacked_n != n):
            raise ConfigError(f"{folder / CONFIG}: n={n}, r={r} but {mod}.lora_A is stacked as "
                              f"{store.shape(keys['A'])} (n, r, in)")
        out[mod] = d
    if not out:
        raise CheckpointError(f"{files[0]}: holds no MultiLoRA tensors")
    return out


def _stacked(store: TensorStore, keys: dict[str, str]) -> tuple[int, int]:
    """(n, r) of a module's stacked lora_A."""
    shape = store.shape(keys["A"])
    return shape[0], shape[1]


def stacked_delta(store: TensorStore, mod: str, keys: dict[str, str], scale: float,
            base: Checkpoint | None) -> Delta:
    """The factored ΔW = [s₁B₁|…|sₙBₙ]·[A₁;…;Aₙ]·scale of one module's stacked tensors
    (``keys``: part ``A``/``B``/``scaling`` → stored key)."""
    source = str(store.file_of(next(iter(keys.values()))))
    for part in ("A", "B", "scaling"):
        if part not in keys:
            raise CheckpointError(f"{source}: module {mod!r} has no lora_{part} tensor")
    a_shape, b_shape = store.shape(keys["A"]), store.shape(keys["B"])
    s_shape = store.shape(keys["scaling"])
    if len(a_shape) != 3 or len(b_shape) != 3 or a_shape[0] != b_shape[0] or a_shape[1] != b_shape[2]:
        raise CheckpointError(f"{source}: {mod}: lora_A {a_shape} and lora_B {b_shape} are not "
                              "stacked (n, r, in) and (n, out, r)")
    n, r, d_in = a_shape
    d_out = b_shape[1]
    if n <= 0 or r <= 0:
        raise CheckpointError(f"{source}: tensor {keys['A']!r} stacks n = {n} modules of rank "
                              f"r = {r}; both must be at least 1")
    if s_shape not in ((n,), (n, d_out), (n, 1)):
        raise CheckpointError(f"{source}: {mod}: lora_scaling shape {s_shape} is neither (n,) nor "
                              "(n, out)")

    def load() -> _delta.Factors:
        a = store.get(keys["A"]).to(torch.float32)  # (n, r, in)
        b = store.get(keys["B"]).to(torch.float32)  # (n, out, r)
        s = store.get(keys["scaling"]).to(torch.float32).reshape(n, -1, 1)  # (n, 1|out, 1)
        b_cat = (b * s * scale).permute(1, 0, 2).reshape(d_out, n * r)  # [s₁B₁|…|sₙBₙ]: (out, n·r)
        a_cat = a.reshape(n * r, d_in)  # [A₁; …; Aₙ]: (n·r, in)
        return b_cat, a_cat

    base_w = base.oriented(mod, (d_out, d_in)) if base is not None else None
    return _delta.factored(mod, (d_out, d_in), load, method="multilora", source=source,
                           rank=n * r, base=base_w)
