"""Request → Plan: every "decide once" decision of an analysis, made before any weight is read and
without torch.

A :class:`Request` names the sources (1: ``analyze``/``snapshot``/``check``; 2: ``compare``; N:
``report`` and collections), the base and the :class:`~deltaspec.options.Options`. :func:`build`
then, once each:

- locates every source (a folder, a Hub id with its revision, or a live object kept as is) and
  detects its format (plain PEFT LoRA adapters from their config alone, torch-free; every other
  format through the loaders' table);
- decides the base of every side (given, or named by the adapter's config: a note says so);
- applies ``compare``'s rule: two full checkpoints and no base are the one update ΔW = b − a;
- chooses the executor, as data with its reason: ``numpy`` (:mod:`deltaspec.engine.host`) when one
  plain LoRA adapter in safetensors is analysed without a base on the CPU — the route of each of its
  modules decided from the header's shapes — else ``torch`` (:func:`deltaspec.loop.run_plan`).

Modules are selected and paired in one place, :func:`pair` (by
:func:`~deltaspec.names.match_key`, for 1, 2 or N sides); a module filter that selects nothing is an
error naming the filter. :func:`deltaspec.execute.execute` runs a plan.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaspec import patterns
from deltaspec.errors import CheckpointError, DeltaspecError, ShapeError, UsageError
from deltaspec.names import match_key, module_order
from deltaspec.options import Options
from deltaspec.world import launched

NUMPY, TORCH = "numpy", "torch"
LORA = "peft-lora"
DEVICES = ("auto", "cpu")  # a factored update of rank r costs O((m + n)·r²) on any device


@dataclass(frozen=True)
class Request:
    """What a command asks: ``sources`` (paths, Hub ids or live objects), the ``base`` as given,
    the options; ``config``: the adapter config of an adapter state dict (one source);
    ``collection``: N independent updates of one base (no full − full rule)."""

    sources: tuple[Any, ...]
    base: Any = None
    options: Options = field(default_factory=Options)
    config: Any = None
    collection: bool = False


@dataclass(frozen=True)
class Side:
    """One located source: ``given`` as the user gave it, ``label`` (how messages name it),
    ``folder`` (None for a live object), ``format`` (None: the loader detects it), ``base`` (the
    decided base: a folder, a live object, or None), ``config`` (a live adapter's)."""

    given: Any
    label: str
    folder: Path | None
    format: str | None
    base: Any = None
    config: Any = None


@dataclass(frozen=True)
class HostWork:
    """What the numpy executor reads, decided from the header: the weights file, the adapter's
    config, the header's entries and the selected modules' factor keys (module →
    {"lora_A": key, "lora_B": key}, in the loader's order)."""

    weights: Path
    config: dict[str, Any]
    entries: dict[str, Any]
    modules: dict[str, dict[str, str]]


@dataclass(frozen=True)
class Plan:
    """The decisions: ``sides`` (after compare's full − full rule), the executor and why, and for
    the numpy executor its work (:class:`HostWork`)."""

    sides: tuple[Side, ...]
    options: Options
    executor: str
    reason: str
    host: HostWork | None = None
    difference: bool = False  # two full checkpoints, no base: the one update ΔW = b − a

    @property
    def names(self) -> tuple[str, ...]:
        """How errors name the sides."""
        return tuple(s.label for s in self.sides)


def is_live(source: Any) -> bool:
    """A live object (PeftModel, nn.Module, state dict) rather than a path or Hub id."""
    return not isinstance(source, (str, os.PathLike))


def describe(source: Any) -> str:
    """How messages and reports name a source (no torch: see :func:`deltaspec.loaders.sources.live.describe`).

    >>> describe("runs/lora")
    'runs/lora'
    """
    if not is_live(source):
        return str(source)
    from deltaspec.loaders.sources.live import describe as live_describe

    return live_describe(source)


def locate(source: Any, revision: str | None) -> Path | None:
    """The checkpoint folder of ``source`` (a folder, a weights file in one, or a Hub id resolved
    with ``revision``); None for a live object."""
    if is_live(source):
        return None
    if os.path.isdir(source):  # the common case, decided without the loaders (or torch)
        return Path(source)
    from deltaspec.loaders.sources import hub
    from deltaspec.loaders.store import exists

    p = hub.locate(source, revision)
    if not exists(p):
        raise CheckpointError(f"{p}: no such file or directory")
    return p.parent if p.is_file() else p


def detect(source: Any, folder: Path | None) -> str:
    """The format of ``source`` (located at ``folder``): a plain PEFT LoRA adapter from its
    config alone, torch-free; else the loaders' table (a live object: its kind)."""
    if folder is not None and _lora_config(folder) is not None:
        return LORA
    from deltaspec.loaders import detect_format

    return detect_format(source if folder is None else folder)


def _lora_config(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """(adapter folder, config) of a PEFT LoRA adapter (not a MoE fork), else None."""
    from deltaspec.config_files import parse_json_file
    from deltaspec.loaders.peft import config as peft_config

    try:
        adapter = peft_config.find_adapter_dir(folder)
        config = parse_json_file(adapter / peft_config.CONFIG) if adapter is not None else None
    except DeltaspecError:
        return None  # the loaders' table reports it in its own words
    if not isinstance(config, dict) or str(config.get("peft_type")).upper() != "LORA" \
            or peft_config.MOE_FORK_KEY in config:
        return None
    return adapter, config  # type: ignore[return-value]


def base_of(folder: Path | None, base: Any, opts: Options) -> Any:
    """The base of one side, decided once: a live base as is; for a folder the given one
    (located) or the one its config names (a note says so); for a live source the given one."""
    if base is not None and is_live(base):
        return base
    if folder is None:
        if base is None:
            return None
        from deltaspec.loaders.sources import hub

        return hub.locate(base, what="base model")
    from deltaspec.loaders.sources import discovery

    return discovery.choose_base(folder, base, discover=opts.discover_base)


def side(source: Any, base: Any = None, opts: Options | None = None, config: Any = None) -> Side:
    """One source located and its base decided (its format is left to the loaders): the side a
    command reads without planning an analysis — ``deltaspec.load``, and the commands that act
    on the deltas themselves (compress, extract, verify-merge, zoo, trajectory) through
    :func:`deltaspec.loaders.registry.load_side`."""
    opts = opts or Options()
    folder = None if config is not None else locate(source, opts.revision)
    return Side(source, describe(source), folder, None, base_of(folder, base, opts), config)


def build(request: Request) -> Plan:
    """Decide everything about ``request`` that needs no weight (see the module doc)."""
    opts = request.options
    if not request.sources:
        raise UsageError("nothing to analyse: no update given")
    found = [(s, None if request.config is not None else locate(s, opts.revision))
             for s in request.sources]
    formats = [detect(s, folder) if request.config is None else None for s, folder in found]
    difference = len(found) == 2 and request.base is None and formats == ["full", "full"] \
        and not request.collection
    if difference:  # the update is b − a: b's side, a (located once) its base
        (a, folder_a), (b, folder_b) = found
        sides: tuple[Side, ...] = (Side(b, describe(b), folder_b, "full",
                                        a if folder_a is None else folder_a),)
    else:
        sides = tuple(Side(s, describe(s), folder, fmt, base_of(folder, request.base, opts),
                           request.config)
                      for (s, folder), fmt in zip(found, formats, strict=True))
    executor, reason, host = choose_executor(sides, opts)
    return Plan(sides, opts, executor, reason, host, difference)


def choose_executor(sides: Sequence[Side], opts: Options) -> tuple[str, str, HostWork | None]:
    """(executor, reason, the numpy executor's work): numpy when one plain PEFT LoRA adapter in
    safetensors is analysed without a base on the CPU with options it honours, else torch."""
    other = sorted(f.name for f in dataclasses.fields(Options) if not f.metadata.get("host")
                   and getattr(opts, f.name) != f.default)
    side = sides[0]
    why = ("several updates" if len(sides) > 1 else "a live object" if side.folder is None
           else f"format {side.format}" if side.format != LORA
           else "a base (base-relative metrics)" if side.base is not None
           else f"option(s) {', '.join(other)}" if other
           else f"device {opts.device}" if opts.device not in DEVICES
           else "a torchrun world" if launched() else None)
    if why is not None:
        return TORCH, f"torch executor: {why}", None
    assert side.folder is not None
    found = _lora_config(side.folder)
    assert found is not None
    adapter, config = found
    from deltaspec.loaders.peft import config as peft_config

    peft_config.check_config(adapter / peft_config.CONFIG, config, opts.allow_modified_base)
    weights = adapter / peft_config.WEIGHTS[0]
    entries, factors, why = host_factors(weights)
    if why is not None:
        return TORCH, f"torch executor: {why}", None
    chosen = {n: factors[n] for (n,) in pair([list(factors)], opts.include)}  # none: an error
    return (NUMPY, "numpy executor: every module factored, no base, CPU",
            HostWork(weights, config, entries, chosen))


def host_factors(weights: Path) -> tuple[dict[str, Any], dict[str, dict[str, str]], str | None]:
    """(the header's entries, module → {"lora_A": key, "lora_B": key} in the loader's order,
    None), or ({}, {}, why not) when a tensor of ``weights`` is not a plain 2-D factor of a linear
    LoRA module of rank below min(m, n) in a dtype the numpy executor widens — decided from the
    header alone."""
    from deltaspec.engine import routes
    from deltaspec.loaders.header import DTYPES, HeaderError, read_header
    from deltaspec.loaders.peft import keys as lora_keys

    if not weights.is_file():
        return {}, {}, "weights not in safetensors"
    try:
        with open(weights, "rb") as fh:
            entries = read_header(fh)
    except HeaderError as exc:  # the torch executor's loader reports it in its own words
        return {}, {}, f"header not read here ({exc})"
    g = lora_keys.group(sorted(entries))  # the store's order: the last of two spellings wins alike
    if g.base_layer or g.full or g.tokens or g.other:
        return {}, {}, "tensors other than LoRA factors"
    out = {}
    for name in sorted(g.lora, key=module_order):
        keys = g.lora[name].keys
        if set(keys) != {"lora_A", "lora_B"}:
            return {}, {}, f"{name}: not a plain linear LoRA module"
        a, b = entries[keys["lora_A"]], entries[keys["lora_B"]]
        plain = len(a.shape) == 2 and len(b.shape) == 2 and b.shape[1] == a.shape[0] > 0
        if not plain or routes.choose(factored=True, inner_rank=a.shape[0],
                                      shape=(b.shape[0], a.shape[1])) != routes.FACTORED:
            return {}, {}, f"{name}: factor shapes the factored route does not take"
        if a.dtype not in DTYPES or b.dtype not in DTYPES:
            return {}, {}, f"{name}: dtype {a.dtype}/{b.dtype}"
        out[name] = keys
    return entries, out, None if out else "no LoRA module"


def partner(names: Sequence[str]) -> Callable[[str], str | None]:
    """name → the same module among ``names`` (any prefix spelling: :func:`~deltaspec.names.match_key`),
    or None — the pairing rule of :func:`pair`, for a lookup that reports misses itself.

    >>> partner(["base_model.model.m.q"])("m.q"), partner(["m.q"])("m.k")
    ('base_model.model.m.q', None)
    """
    keyed = {match_key(n): n for n in names}
    return lambda name: keyed.get(match_key(name))


def pair(sides: Sequence[Sequence[str]], include: str | None = None,
         modules: Sequence[str] | None = None,
         labels: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    """The modules to analyse, paired across sides by :func:`~deltaspec.names.match_key`: one
    tuple of names (one per side) per module every side has, in the first side's order (or in
    ``modules``' order, names of the first side in any prefix spelling), filtered by ``include``
    (a regex on the first side's names, re.search). No module in common, or an ``include`` or
    ``modules`` that selects none, is an error naming it.

    >>> pair([["m.q", "m.k"], ["base_model.model.m.k"]])
    [('m.k', 'base_model.model.m.k')]
    """
    labels = list(labels or [chr(ord("A") + i) for i in range(len(sides))])
    first = list(sides[0])
    if modules is not None:
        own = partner(first)
        missing = [m for m in modules if own(m) is None]
        if missing:
            raise DeltaspecError(f"module {missing[0]!r} is not in {labels[0]} "
                                 f"(e.g. {', '.join(first[:3])})")
        first = list(dict.fromkeys(str(own(m)) for m in modules))
    finders = [partner(s) for s in sides[1:]]
    items: list[tuple[str, ...]] = []
    for n in first:
        found = [find(n) for find in finders]
        if all(f is not None for f in found):
            items.append((n, *(str(f) for f in found)))
    if not items:
        raise DeltaspecError(f"{' and '.join(labels)} have no module in common")
    if include:
        kept = [it for it in items if patterns.search(include, it[0], "include")]
        if not kept:
            raise UsageError(f"--include {include!r:.80} matches none of the {len(items)} "
                             f"modules, so it selects no module (e.g. {items[0][0]})")
        items = kept
    return items


def one_sided(sides: Sequence[Sequence[str]], items: Sequence[tuple[str, ...]]) -> list[list[str]]:
    """Per side, its modules that :func:`pair` left unpaired (sorted)."""
    return [sorted(set(s) - {it[i] for it in items}) for i, s in enumerate(sides)]


def check_shapes(shapes: Sequence[Mapping[str, tuple[int, int]]], items: Sequence[tuple[str, ...]],
                 labels: Sequence[str]) -> None:
    """Every paired module has one shape on every side, or a :class:`ShapeError` naming it."""
    for it in items:
        for i in range(1, len(it)):
            if shapes[i][it[i]] != shapes[0][it[0]]:
                raise ShapeError(f"module {it[0]!r}: shape {shapes[0][it[0]]} in {labels[0]} but "
                                 f"{shapes[i][it[i]]} in {labels[i]}")


__all__ = ["NUMPY", "TORCH", "HostWork", "Plan", "Request", "Side", "base_of", "build",
           "check_shapes", "choose_executor", "describe", "detect", "host_factors", "is_live",
           "locate", "one_sided", "pair", "partner", "side"]
