"""One schema per config file: each loader declares its keys once, in its own file, and
:func:`check` refuses a config whose values have the wrong type or range — before any arithmetic,
in one line naming the file and the key. No torch here (the torch-free plan checks LoRA configs).

A schema maps a key to a :class:`Key`: its kind (``int``, ``number``, ``bool``, ``str``,
``mapping``, ``list``, ``strs`` — a string or a list of strings), an inclusive range for numbers,
and whether it is required. Absent keys take the loader's default; ``null`` is accepted only for
keys marked ``nullable`` (PEFT writes ``null`` for those when unset) and is then removed from the
config, so that the loader's default applies as for a missing key. Every number that drives a loop or an
allocation has an upper bound here (a rank, a seed, a count of terms), so a file cannot ask for
10¹² iterations.

>>> check({"r": 8}, {"r": Key("int", 1, MAX_RANK)}, "adapter_config.json")
>>> check({"r": -1}, {"r": Key("int", 1, MAX_RANK)}, "adapter_config.json")
Traceback (most recent call last):
deltaspec.errors.ConfigError: adapter_config.json: 'r' must be an integer in [1, 65536], not -1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaspec.errors import ConfigError

MAX_RANK = 1 << 16  # r, init_r, n, experts, …: far above any real adapter
MAX_SEED = (1 << 64) - 1  # torch.Generator.manual_seed takes seeds in [0, 2⁶⁴)
MAX_COUNT = 1 << 20  # a count that sizes a loop over modules, tasks or frequencies

_KINDS = {"int": "an integer", "number": "a finite number", "bool": "true or false",
          "str": "a string", "mapping": "a mapping", "list": "a list",
          "strs": "a string or a list of strings"}


@dataclass(frozen=True)
class Key:
    """One config key: its kind, its inclusive range (numbers) and whether it must be there."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    required: bool = False
    nullable: bool = False  # null means unset (PEFT writes null for these); else null is refused


Schema = dict[str, Key]


def check(config: Any, schema: Schema, where: str | Path) -> None:
    """Raise a one-line :class:`ConfigError` naming ``where`` and the key for the first value of
    ``config`` that does not fit ``schema``."""
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: expected a JSON object, not {type(config).__name__}")
    for name, key in schema.items():
        if name not in config:
            if key.required:
                raise ConfigError(f"{where}: {name!r} is missing")
            continue
        value = config[name]
        if value is None and key.nullable:
            del config[name]  # null is "unset": the loader's default applies, as for a missing key
            continue
        if not _fits(value, key):
            raise ConfigError(f"{where}: {name!r} must be {_describe(key)}, not {value!r:.80}")


def _fits(value: Any, key: Key) -> bool:
    if key.kind in ("int", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if key.kind == "int" and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return (key.lo is None or value >= key.lo) and (key.hi is None or value <= key.hi)
    if key.kind == "bool":
        return isinstance(value, bool)
    if key.kind == "str":
        return isinstance(value, str)
    if key.kind == "mapping":
        return isinstance(value, dict)
    if key.kind == "list":
        return isinstance(value, list)
    if key.kind == "strs":
        return isinstance(value, str) or (isinstance(value, list)
                                          and all(isinstance(v, str) for v in value))
    raise ValueError(f"unknown schema kind {key.kind!r}")


def _describe(key: Key) -> str:
    text = _KINDS[key.kind]
    if key.lo is not None or key.hi is not None:
        lo = "-∞" if key.lo is None else f"{key.lo:g}"
        hi = "∞" if key.hi is None else (f"{key.hi:g}" if key.hi < 1e15 else str(key.hi))
        text += f" in [{lo}, {hi}]"
    return text


def values(table: Any, key: Key, where: str | Path, name: str) -> None:
    """Check every value of a mapping (``rank_pattern``, ``alpha_pattern``) against ``key``."""
    if table is None:
        return
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: {name!r} must be a mapping, not {table!r:.80}")
    for pattern, value in table.items():
        if not _fits(value, key):
            raise ConfigError(f"{where}: {name}[{pattern!r:.80}] must be {_describe(key)}, not "
                              f"{value!r:.80}")


__all__ = ["MAX_COUNT", "MAX_RANK", "MAX_SEED", "Key", "Schema", "check", "values"]
