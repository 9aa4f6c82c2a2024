"""A collection's sources: labels, loading (one place), and the checks that they are updates of
one base — the first two modules whose shapes differ are named; modules some sources lack are
left out with a note counting them."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deltaspec import plan
from deltaspec.errors import DeltaspecError, UsageError
from deltaspec.loaders.registry import Deltas, load_side
from deltaspec.loaders.sources.live import describe
from deltaspec.options import Options
from deltaspec.report.data import _check_shapes, _common, check_labels, parse_updates

_BAD = re.compile(r"[^A-Za-z0-9_.+\-]+")
_LABELLED = re.compile(r"^[^=/\\]+=.+$")


def parse_sources(specs: Sequence[str]) -> dict[str, str]:
    """Command-line arguments → label → source. ``NAME=PATH`` is labelled as in ``report`` (one
    checkpoint per label); a bare path or Hub id is labelled by its last path components (as few
    as make every label distinct). An argument that is an existing path is always a path.

    >>> parse_sources(["runs/a/adapter", "runs/b/adapter", "x=org/name"])
    {'a-adapter': 'runs/a/adapter', 'b-adapter': 'runs/b/adapter', 'x': 'org/name'}
    """
    labelled = [s for s in specs if _LABELLED.match(s) and not os.path.exists(s)]
    named = parse_updates(labelled) if labelled else {}
    for label, path in named.items():
        if isinstance(path, list):
            raise UsageError(f"label {label!r}: one checkpoint per label in a collection "
                             f"(got {len(path)}: {', '.join(path[:3])}); give each its own NAME=PATH")
    plain = [s for s in specs if s not in labelled]
    derived = derive_labels(plain)
    out: dict[str, str] = {}
    for spec in specs:
        if spec in labelled:
            label, _, _ = spec.partition("=")
            out[label.strip()] = str(named[label.strip()])
        else:
            label = derived[spec]
            if label in out:
                raise UsageError(f"label {label!r} given twice ({out[label]} and {spec}); "
                                 "name them with NAME=PATH")
            out[label] = spec
    check_labels(list(out))
    return out


def derive_labels(paths: Sequence[str]) -> dict[str, str]:
    """Path → a label: its last component, or as many last components (joined by ``-``) as make
    the labels distinct; characters other than letters, digits and ``_ . + -`` become ``_``.

    >>> derive_labels(["out/seed1/lora", "out/seed2/lora", "org/model@v2"])
    {'out/seed1/lora': 'seed1-lora', 'out/seed2/lora': 'seed2-lora', 'org/model@v2': 'model_v2'}
    """
    parts = {p: [x for x in Path(p.rstrip("/\\")).parts if x not in ("/", ".", "..")] or [p]
             for p in dict.fromkeys(paths)}
    depth = dict.fromkeys(parts, 1)
    while True:
        labels = {p: _BAD.sub("_", "-".join(c[-depth[p]:])).strip("_") or "update"
                  for p, c in parts.items()}
        clash = [p for p, lb in labels.items() if list(labels.values()).count(lb) > 1
                 and depth[p] < len(parts[p])]
        if not clash:
            return labels
        for p in clash:
            depth[p] += 1


def labelled(sources: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """``deltaspec.zoo``'s ``sources`` → label → source: a mapping is taken as labelled; a list
    of folders/Hub ids is labelled like the command line; live objects are numbered."""
    if isinstance(sources, Mapping):
        out = {str(k): v for k, v in sources.items()}
    elif isinstance(sources, str | Path):
        raise UsageError("zoo needs a list of two or more updates, not one path")
    else:
        items = list(sources)
        paths = [str(x) for x in items if isinstance(x, str | Path)]
        if len(paths) == len(items):
            out = parse_sources(paths)
        else:
            out = {f"update{i + 1}": x for i, x in enumerate(items)}
    check_labels(list(out))
    if len(out) < 2:
        raise UsageError(f"a collection needs at least two updates (got {len(out)})")
    return out


def load_one(label: str, source: Any, base: Any, opts: Options) -> Deltas:
    """Load one update (the one place a collection calls the loaders); a failure names it."""
    try:
        return load_side(plan.side(source, base, opts), opts)
    except DeltaspecError as exc:
        where = describe(source)
        msg = str(exc) if where in str(exc) else f"{where}: {exc}"
        raise type(exc)(f"update {label!r}: {msg}") from None


def load_all(updates: Mapping[str, Any], base: Any,
             opts: Options) -> tuple[dict[str, Deltas], dict[str, list[str]], list[str]]:
    """Every update loaded (nothing read yet), checked to be of one base; returns (label →
    deltas, label → its names of the common modules in the first update's order, notes)."""
    loaded = {label: load_one(label, src, base, opts) for label, src in updates.items()}
    _check_shapes(loaded, {label: describe(src) for label, src in updates.items()})
    names, _ = _common(loaded, opts.include)
    _, only = _common(loaded, None)  # modules of some updates only (not those --include drops)
    notes = list(dict.fromkeys(f"note: {n}" for d in loaded.values() for n in getattr(d, "notes", [])))
    left_out = {label: len(v) for label, v in only.items() if v}
    if left_out:
        total = sum(left_out.values())
        per = ", ".join(f"{label}: {n}" for label, n in left_out.items())
        notes.append(f"note: {total} module(s) present in some updates only were left out "
                     f"({per}); analysed over the {len(next(iter(names.values())))} common ones")
    return loaded, names, notes


__all__ = ["derive_labels", "labelled", "load_all", "load_one", "parse_sources"]
