"""Rules of ``deltaspec check``: tolerances, bounds and subspace bounds, read from TOML or JSON.

The defaults and their semantics are documented in :mod:`deltaspec.gate.check`. A rules file::

    ignore = ["lm_head"]          # regexes (re.search) of modules not checked
    fail_on_new = false           # modules not in the baseline: warning (true: failure)
    fail_on_rank_change = true    # rank_bound or method changed: failure
    [defaults]                    # replaces the built-in tolerance of each metric named
    normalized_entropy = {abs = 0.02, rel = 0.05, direction = "down"}
    fro_norm = false              # not checked
    [bounds]                      # absolute bounds on the current value
    normalized_entropy = ">= 0.3"
    top1_share = {max = 0.6}
    untrained = "<= 0"            # no module with ΔW ≡ 0 (a LoRA B never trained)
    [subspace]
    min_similarity = 0.5          # false: no subspace check
    k = 8                         # ≤ the baseline's k
    sides = ["left", "right"]
    [kinds.down_proj]             # per module kind (last path component): tolerances, and
    top1_share = {abs = 0.1}      # [kinds.down_proj.bounds] / [kinds.down_proj.subspace]

A tolerance named in ``[defaults]`` or ``[kinds.X]`` replaces the inherited one for that metric
(keys not given are 0 / "both"); ``false`` removes it. Unknown keys or metric names are a
:class:`~deltaspec.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaspec import patterns
from deltaspec.config_files import parse_json_file, parse_toml_file
from deltaspec.errors import ConfigError
from deltaspec.metrics.table import METRICS as TABLE
from deltaspec.metrics.table import names

METRICS = names("spectral", "base_relative")  # the metrics a rules file may name
DIRECTIONS = ("both", "down", "up")
SIDES = ("left", "right")
_SLACK = 1e-9  # relative float round-off allowed on top of every tolerance


@dataclass(frozen=True)
class Tolerance:
    """|current − baseline| ≤ abs + rel·|baseline| (only drops fail for "down", rises for "up")."""

    abs: float = 0.0
    rel: float = 0.0
    direction: str = "both"

    def allowed(self, ref: float) -> float:
        """The largest change allowed from ``ref`` (abs + rel·|ref|)."""
        return self.abs + self.rel * abs(ref)

    def slack(self, ref: float) -> float:
        """Float round-off allowed on top of :meth:`allowed` (not shown in limits)."""
        return _SLACK * max(1.0, abs(ref))


@dataclass(frozen=True)
class Bound:
    """min ≤ current ≤ max (either may be None)."""

    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Policy:
    """The checks for one module kind."""

    tolerances: dict[str, Tolerance]
    bounds: dict[str, Bound] = field(default_factory=dict)
    min_similarity: float | None = 0.5
    subspace_k: int | None = None
    sides: tuple[str, ...] = SIDES


# From the metric table's ``gate`` entries (calibrated in deltaspec.gate.check's docstring: a reseeded
# run of one recipe passes, a collapse fails); only the change away from "better" fails.
DEFAULT_TOLERANCES = {
    name: Tolerance(m.gate.abs, m.gate.rel, m.failing_direction)
    for name, m in TABLE.items() if name in METRICS and m.gate is not None
}
DEFAULT_POLICY = Policy(DEFAULT_TOLERANCES)


@dataclass(frozen=True)
class Rules:
    """Parsed rules: a default policy, per-kind policies, and what to ignore."""

    default: Policy = DEFAULT_POLICY
    kinds: dict[str, Policy] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()
    fail_on_new: bool = False
    fail_on_rank_change: bool = True

    def policy(self, kind: str) -> Policy:
        """The policy of module kind ``kind``."""
        return self.kinds.get(kind, self.default)

    def ignored(self, name: str) -> bool:
        """True when module ``name`` matches an ``ignore`` pattern."""
        return any(patterns.search(p, name) for p in self.ignore)

_TOP = ("ignore", "fail_on_new", "fail_on_rank_change", "defaults", "bounds", "subspace", "kinds")
_BOUND = re.compile(r"^\s*(>=|<=|≥|≤)\s*([-+0-9.eE]+|nan|inf)\s*$")


def _number(v: Any, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
        raise ConfigError(f"{where}: expected a number in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _table(v: Any, where: str) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected a table, got {v!r}")
    return v


def _metric(key: str, where: str) -> str:
    if key not in METRICS:
        raise ConfigError(f"{where}: unknown metric {key!r} (known: {', '.join(METRICS)})")
    return key


def _tolerances(raw: dict[str, Any], where: str, inherit: dict[str, Tolerance]) -> dict[str, Tolerance]:
    out = dict(inherit)
    for key, spec in raw.items():
        _metric(key, where)
        if spec is False:
            out.pop(key, None)
            continue
        spec = _table(spec, f"{where} {key}")
        extra = sorted(set(spec) - {"abs", "rel", "direction"})
        if extra:
            raise ConfigError(f"{where} {key}: unknown key(s) {', '.join(extra)} (use abs, rel, direction)")
        direction = spec.get("direction", "both")
        if direction not in DIRECTIONS:
            raise ConfigError(f"{where} {key}: direction must be one of {', '.join(DIRECTIONS)}")
        out[key] = Tolerance(_number(spec.get("abs", 0.0), f"{where} {key}.abs", 0.0),
                             _number(spec.get("rel", 0.0), f"{where} {key}.rel", 0.0), direction)
    return out


def _bound(spec: Any, where: str) -> Bound:
    if isinstance(spec, str):
        m = _BOUND.match(spec)
        if not m:
            raise ConfigError(f"{where}: cannot read bound {spec!r} (use '>= x', '<= x' or "
                              "{min = x, max = y})")
        value = _number(float(m.group(2)), where)
        return Bound(min=value) if m.group(1) in (">=", "≥") else Bound(max=value)
    spec = _table(spec, where)
    extra = sorted(set(spec) - {"min", "max"})
    if extra or not spec:
        raise ConfigError(f"{where}: a bound table takes min and/or max, got {sorted(spec)}")
    lo, hi = (None if spec.get(k) is None else _number(spec[k], f"{where}.{k}") for k in ("min", "max"))
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"{where}: min {lo:g} is above max {hi:g}")
    return Bound(lo, hi)


def _bounds(raw: Any, where: str, inherit: dict[str, Bound]) -> dict[str, Bound]:
    out = dict(inherit)
    for key, spec in _table(raw, where).items():
        _metric(key, where)
        if spec is False:
            out.pop(key, None)
        else:
            out[key] = _bound(spec, f"{where} {key}")
    return out


def _subspace(raw: Any, where: str, inherit: Policy) -> dict[str, Any]:
    raw = _table(raw, where)
    extra = sorted(set(raw) - {"min_similarity", "k", "sides"})
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (use min_similarity, k, sides)")
    out = {"min_similarity": inherit.min_similarity, "subspace_k": inherit.subspace_k,
           "sides": inherit.sides}
    if "min_similarity" in raw:
        v = raw["min_similarity"]
        out["min_similarity"] = None if v is False else _number(v, f"{where} min_similarity", 0, 1)
    if "k" in raw:
        k = raw["k"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"{where} k: expected a positive integer, got {k!r}")
        out["subspace_k"] = k
    if "sides" in raw:
        sides = raw["sides"]
        if not isinstance(sides, list) or not sides or any(s not in SIDES for s in sides):
            raise ConfigError(f"{where} sides: expected a list of 'left'/'right', got {sides!r}")
        out["sides"] = tuple(sides)
    return out


def _policy(raw: dict[str, Any], where: str, inherit: Policy, section: str) -> Policy:
    tol = {k: v for k, v in raw.items() if k not in ("bounds", "subspace")}
    tolerances = _tolerances(tol, f"{where}: [{section}]", inherit.tolerances)
    prefix = "" if section == "defaults" else f"{section}."
    bounds = _bounds(raw.get("bounds", {}), f"{where}: [{prefix}bounds]", inherit.bounds)
    sub = _subspace(raw.get("subspace", {}), f"{where}: [{prefix}subspace]", inherit)
    return Policy(tolerances, bounds, **sub)


def parse_rules(data: dict[str, Any], where: str = "rules") -> Rules:
    """Rules from a parsed TOML/JSON object; any unknown key or bad value → :class:`ConfigError`."""
    data = _table(data, where)
    extra = sorted(set(data) - set(_TOP))
    if extra:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(extra)} (known: {', '.join(_TOP)})")
    defaults = _table(data.get("defaults", {}), f"{where}: [defaults]")
    for key in ("bounds", "subspace"):
        if key in defaults:
            raise ConfigError(f"{where}: [defaults] cannot hold {key!r}: use a top-level [{key}]")
    top = {"bounds": data.get("bounds", {}), "subspace": data.get("subspace", {})}
    default = _policy({**defaults, **top}, where, DEFAULT_POLICY, "defaults")
    kinds = {kind: _policy(_table(t, f"{where}: [kinds.{kind}]"), where, default, f"kinds.{kind}")
             for kind, t in _table(data.get("kinds", {}), f"{where}: [kinds]").items()}
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
        raise ConfigError(f"{where}: ignore must be a list of regular expressions")
    for p in ignore:
        patterns.check(p, f"{where}: ignore")
    flags = {}
    for key in ("fail_on_new", "fail_on_rank_change"):
        if key in data and not isinstance(data[key], bool):
            raise ConfigError(f"{where}: {key} must be true or false")
        flags[key] = data.get(key, key == "fail_on_rank_change")
    return Rules(default, kinds, tuple(ignore), **flags)


def load_rules_data(path: str | Path) -> dict[str, Any]:
    """The raw rules object of a ``.toml`` file (or ``.json``), read by the guarded reader."""
    p = Path(path)
    if p.suffix.lower() == ".json":
        return parse_json_file(p)
    return parse_toml_file(p)


def merge_rules(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` updated by ``b``, tables merged recursively."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge_rules(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_rules(path: str | Path | None) -> Rules:
    """Parsed rules from a file, or the defaults when ``path`` is None."""
    return Rules() if path is None else parse_rules(load_rules_data(path), str(path))
