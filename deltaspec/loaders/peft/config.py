"""``adapter_config.json`` of a PEFT LoRA adapter: what deltaspec can read, and each module's r, α.

The rules follow PEFT 0.21 (``peft/tuners/lora/model.py`` ``_create_and_replace`` and
``peft/utils/other.py`` ``get_pattern_key``): a module takes the value of the *first* key k of
``rank_pattern`` / ``alpha_pattern`` (in the file's order) for which
``re.match(rf"(.*\\.)?({k})$", module_path)`` succeeds, else the global ``r`` / ``lora_alpha``.
The scale is α/r, or α/√r with ``use_rslora``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltaspec import patterns
from deltaspec.errors import ConfigError, UnsupportedError, UsageError
from deltaspec.loaders import schema

# init_lora_weights values whose initialisation rewrote the base weight (W_res = W − s·B₀A₀, or a
# quantised residual): s·B·A of such an adapter is not its update of the original base.
MODIFIES_BASE = ("pissa", "olora", "corda", "lora_ga", "loftq")
# LoraConfig options whose adapters merge differently from s·B·A (PEFT "variants" other than DoRA).
UNSUPPORTED_OPTIONS = ("use_qalora", "alora_invocation_tokens", "velora_config", "use_bdlora",
                       "arrow_config", "kasa_config", "target_parameters", "layer_replication")
DEFAULT_R, DEFAULT_ALPHA = 8, 8
# A PEFT fork's adapter (HydraLoRA, LoRAMoE: deltaspec.loaders.multi.lora_moe) though its peft_type is LORA.
MOE_FORK_KEY = "lora_nums"

# adapter_config.json of a LoRA adapter: the keys deltaspec's arithmetic reads (schema.check).
SCHEMA: schema.Schema = {
    "r": schema.Key("int", 1, schema.MAX_RANK), "lora_alpha": schema.Key("number"),
    "use_rslora": schema.Key("bool"), "fan_in_fan_out": schema.Key("bool"),
    "use_dora": schema.Key("bool"), "rank_pattern": schema.Key("mapping", nullable=True),
    "alpha_pattern": schema.Key("mapping", nullable=True), "lora_bias": schema.Key("bool"),
}

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def find_adapter_dir(path: Path) -> Path | None:
    """``path`` itself, or its one sub-folder named after an adapter, that holds the config."""
    if (path / CONFIG).is_file():
        return path
    if not path.is_dir():
        return None
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
    if len(subs) > 1:
        names = ", ".join(p.name for p in subs)
        raise UsageError(f"{path}: holds several adapters ({names}); pass one of those folders")
    return subs[0] if subs else None


def check_config(path: Path, config: dict[str, Any], allow_modified_base: bool) -> None:
    """Raise a one-line error naming ``path`` unless deltaspec reads this adapter exactly."""
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedError(f"{path}: peft_type {peft_type!r} is not a LoRA adapter's (this "
                               "reader takes peft_type LORA; the other methods have their own)")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(m) for m in MODIFIES_BASE) and not allow_modified_base:
        raise UnsupportedError(
            f"{path}: init_lora_weights={config['init_lora_weights']!r} changed the base weights, "
            "so s·B·A is not the update of the original base; re-save the adapter with PEFT's "
            "path_initial_model_for_weight_conversion, or pass --allow-modified-base")
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise UnsupportedError(f"{path}: adapters with {option}={config[option]!r} are not "
                                   "supported (their update is not s·B·A)")
    schema.check(config, SCHEMA, path)
    _check_patterns(path, "rank_pattern", config.get("rank_pattern"), _is_rank, "a positive integer")
    _check_patterns(path, "alpha_pattern", config.get("alpha_pattern"), _is_number, "a number")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_rank(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _check_patterns(path: Path, key: str, table: Any, valid: Callable[[Any], bool],
                    kind: str) -> None:
    if table in (None, {}):
        return
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {key!r} must be a mapping, not {table!r:.80}")
    for pattern, value in table.items():
        if not valid(value):
            raise ConfigError(f"{path}: {key}[{pattern!r:.80}] must be {kind}, not {value!r:.80}")
        if not isinstance(pattern, str):
            raise ConfigError(f"{path}: {key} keys must be strings")
        patterns.check(rf"(.*\.)?({pattern})$", f"{path}: {key}", pattern)


def pattern_value(table: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` + lookup: the value of the first matching key, else ``default``
    (matched in bounded time by :mod:`deltaspec.patterns`, with :mod:`re`'s result).

    >>> pattern_value({"q_proj": 2, "layers.0.self_attn.q_proj": 5}, "model.layers.0.self_attn.q_proj", 8)
    2
    >>> pattern_value({"layers\\\\.1\\\\..*proj": 3}, "model.layers.1.mlp.up_proj", 8)
    3
    >>> pattern_value({"proj": 3}, "model.layers.1.mlp.up_proj", 8)
    8
    """
    for key, value in (table or {}).items():
        if patterns.peft_match(key, module):
            return value
    return default


def scale(config: dict[str, Any], module: str, r: int) -> float:
    """The LoRA scale s of ``module`` with rank ``r``: α/r, or α/√r with ``use_rslora``."""
    alpha = float(pattern_value(config.get("alpha_pattern"), module,
                                config.get("lora_alpha", DEFAULT_ALPHA)))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def configured_rank(config: dict[str, Any], module: str) -> int:
    """The rank the config gives ``module`` (the tensors' shapes are authoritative)."""
    return int(pattern_value(config.get("rank_pattern"), module, config.get("r", DEFAULT_R)))


def token_indices(path: Path, config: dict[str, Any], module: str,
                  input_embedding: bool) -> list[int]:
    """The token rows ``trainable_token_indices`` lets ``module`` train.

    A list applies to the input embedding; a mapping names modules (matched like patterns).
    """
    spec = config.get("trainable_token_indices")
    input_spec = spec if input_embedding else None
    found = pattern_value(spec, module, None) if isinstance(spec, dict) else input_spec
    if not isinstance(found, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                              for i in found):
        raise ConfigError(f"{path}: trainable_token_indices gives no list of token ids for "
                          f"module {module!r}")
    return found
