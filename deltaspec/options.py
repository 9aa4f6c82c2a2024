"""The options, declared once: :class:`Options` carries every analysis *and* load setting, taken
by the core (:mod:`deltaspec.plan`, :func:`deltaspec.analyze.run`), the loaders
(:func:`deltaspec.load`) and ``analyze``/``compare``/``spectra`` as keyword arguments.

Each field's metadata (:func:`flag`) says how the command line spells it: the flag, its help, its
value kind and which commands take it; :mod:`deltaspec.cli.options` generates the click options
from it, so a new option is one field here plus the code that uses it.

Imports nothing heavy (no torch, numpy, pandas or click), so that the command line can build an
:class:`Options` while it is still only parsing arguments.

>>> Options(top_k=16).k
8
>>> make_options({"include": "q_proj"}).include
'q_proj'
>>> [f.name for f in cli_fields()][:3]
['top_k', 'k', 'device']
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from deltaspec import patterns
from deltaspec.errors import ConfigError, UsageError

# The commands that make a metric table: every one takes every option that has a flag (unless
# the field says otherwise)
ANALYSING = ("analyze", "compare", "report", "snapshot", "check", "trajectory")
# Every command that reads updates takes the load options (where and how a checkpoint is read):
# zoo (many updates: K, no metric table), compress and extract (they act on the spectrum)
LOADING = (*ANALYSING, "zoo", "compress", "extract")
VERIFY = "verify-merge"  # reads a merged model, its adapter and base: the α/format load options
MERGE_DTYPES = ("bfloat16", "float16")  # the narrow formats of the merge columns (Options.merge_dtype)


def flag(default: Any, decl: str, help: str, kind: str = "text", metavar: str | None = None,
         invert: bool = False, commands: tuple[str, ...] = ANALYSING,
         show_default: bool = False, host: bool = False, choices: tuple[str, ...] = ()) -> Any:
    """A dataclass field with its command-line spelling: ``decl`` (e.g. ``"--top-k"``), ``help``,
    ``kind`` (``count``: a positive integer, ``positive``: a positive number, ``device``,
    ``switch``: ``--x/--no-x``, ``flag``: present or not, ``choice``: one of ``choices``,
    ``text``), ``invert``: the flag sets the
    field to False (``--no-base-discovery`` → ``discover_base=False``), ``commands``: which
    commands take it, ``host``: the numpy executor (:mod:`deltaspec.engine.host`) honours it or
    has no use for it (else a non-default value sends the plan to the torch executor).

    >>> dataclasses.fields(Options)[0].metadata["decl"]
    '--top-k'
    """
    return field(default=default, metadata=dict(decl=decl, help=help, kind=kind, metavar=metavar,
                                                invert=invert, commands=commands,
                                                show_default=show_default, host=host,
                                                choices=choices))


def core(default: Any, host: bool = False) -> Any:
    """A field with no flag (the API's only); ``host`` as for :func:`flag`."""
    return field(default=default, metadata=dict(host=host))


@dataclass(frozen=True)
class Options:
    """How one analysis runs (and how its checkpoints are read). Every field is the keyword
    argument of the same name; fields with a flag are the commands' shared options."""

    top_k: int | None = flag(None, "--top-k", "Take every spectral metric over the top K singular "
                             "values only.", "count", host=True)
    k: int = flag(8, "--k", "Subspace dimension K for similarity and amplification.", "count",
                  show_default=True, host=True, commands=(*ANALYSING, "zoo"))
    device: str = flag("auto", "--device", "auto (CUDA when present), cpu, cuda or cuda:N.",
                       "device", show_default=True, host=True, commands=LOADING)
    intruders: bool = flag(False, "--intruders/--no-intruders", "Count intruder dimensions (with "
                           "--base). Costs a full decomposition of every base matrix: slow on "
                           "large models, hence off by default.", "switch", show_default=True, host=True)
    include: str | None = flag(None, "--include", "Only modules whose name matches this regular "
                               "expression.", metavar="REGEX", host=True,
                               commands=LOADING)
    progress: bool = core(False, host=True)  # a progress bar on stderr (CLI: a terminal and no -q)
    allow_modified_base: bool = flag(False, "--allow-modified-base", "Read PiSSA/OLoRA/LoftQ/… "
                                     "adapters although s·B·A is not their update.", "flag", host=True,
                                     commands=(*LOADING, VERIFY))
    lora_alpha: float | None = flag(None, "--lora-alpha", "LoRA α of checkpoints that do not save "
                                    "it (the MTL-LoRA code base's final_checkpoint.pt); without it "
                                    "their norms are reported with α/r = 1.", "positive", "A", host=True,
                                    commands=(*LOADING, VERIFY))
    mtl_temperature: float | None = flag(None, "--mtl-temperature", "MTL-LoRA's softmax "
                                         "temperature over its lora_B heads (not saved; default "
                                         "1.0, the code base's default).", "positive", "T", host=True,
                                         commands=(*LOADING, VERIFY))
    shard: tuple[int, int] | None = core(None)  # (rank, world): this process's share of the modules
    keep_spectra: bool = core(False)  # keep every module's Spectrum in the result (core entry only)
    vectors: bool = core(False)  # also compute the top-K singular vectors (kept with keep_spectra)
    discover_base: bool = flag(True, "--no-base-discovery", "Without --base, do not use the base "
                               "the adapter's config names.", "flag", invert=True, host=True,
                               commands=LOADING)
    revision: str | None = flag(None, "--revision", "Revision (branch, tag or commit) of the Hub "
                                "ids given without @REV (not --base: write org/name@REV there).",
                                metavar="REV", host=True, commands=(*LOADING, VERIFY))
    adapter_name: str | None = core(None, host=True)  # a live PeftModel's adapter (default: active)
    merge_dtype: str = flag("bfloat16", "--merge-dtype", "With --base: the dtype W + ΔW is stored "
                            "in for lost_in_bf16 and bf16_merge_error.", "choice",
                            show_default=True, host=True, choices=MERGE_DTYPES)  # no base: unused
    heavy_tail: bool = flag(False, "--alpha/--no-alpha", "Heavy-tail α of ΔW's spectral density "
                            "(and of W's with --base; a values-only decomposition of each base "
                            "matrix), as WeightWatcher fits it.", "switch", show_default=True,
                            host=True)

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise UsageError(f"top_k must be a positive integer, not {self.top_k}")
        if isinstance(self.k, bool) or self.k < 1:
            raise UsageError(f"k must be a positive integer, not {self.k}")
        if self.include is not None:
            try:  # the one bounded matcher's verdict, as a usage error of this option
                patterns.check(self.include, "include")
            except ConfigError as exc:
                raise UsageError(str(exc)) from None
        for name in ("lora_alpha", "mtl_temperature"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float))
                                          and not isinstance(value, bool) and 0 < value < math.inf):
                raise UsageError(f"{name} must be a positive number, not {value!r}")
        if self.merge_dtype not in MERGE_DTYPES:
            raise UsageError(f"merge_dtype must be one of {', '.join(MERGE_DTYPES)}, "
                             f"not {self.merge_dtype!r}")
        if self.shard is not None:
            rank, world = self.shard
            if not 0 <= rank < world:
                raise UsageError(f"shard: rank {rank} is not in 0 … {world - 1}")


FIELDS = tuple(f.name for f in dataclasses.fields(Options))
# Options only the core entry takes: the public functions return a DataFrame, which cannot carry
# spectra (pandas drops such attributes); ``deltaspec.spectra`` returns them.
CORE_ONLY = ("keep_spectra", "vectors")


def cli_fields(command: str | None = None) -> list[dataclasses.Field[Any]]:
    """The fields that have a flag (taken by ``command``, or by any command), in declared order.

    >>> "lora_alpha" in [f.name for f in cli_fields("check")]
    True
    """
    return [f for f in dataclasses.fields(Options)
            if "decl" in f.metadata and (command is None or command in f.metadata["commands"])]


def dest(f: dataclasses.Field[Any]) -> str:
    """The name of the parsed command-line value of field ``f`` (``no_base_discovery`` for
    ``discover_base``).

    >>> dest(next(f for f in cli_fields() if f.name == "discover_base"))
    'no_base_discovery'
    """
    decl = str(f.metadata["decl"]).split("/")[0]
    return decl.lstrip("-").replace("-", "_") if f.metadata["invert"] else f.name


def from_flags(values: dict[str, Any], **changes: Any) -> Options:
    """Parsed command-line values (by :func:`dest`) → :class:`Options`; a value not given (absent
    or None) keeps the field's default; ``changes`` last.

    >>> from_flags({"no_base_discovery": True, "k": None}).discover_base
    False
    """
    fields: dict[str, Any] = {}
    for f in cli_fields():
        value = values.get(dest(f))
        if value is not None:
            fields[f.name] = (not value) if f.metadata["invert"] else value
    return Options(**(fields | changes))


def make_options(options: dict[str, Any], public: bool = False) -> Options:
    """Validate keyword options into an :class:`Options` (unknown names are an error;
    ``public``: the keywords of ``analyze``/``compare``, which keep no spectra)."""
    known = [f for f in FIELDS if not (public and f in CORE_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        hint = (" (spectra: use deltaspec.spectra(), or deltaspec.analyze.run() with "
                "Options(keep_spectra=True))" if set(unknown) & set(CORE_ONLY) else "")
        raise UsageError(f"unknown option(s): {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(known))}){hint}")
    return Options(**options)


__all__ = ["ANALYSING", "CORE_ONLY", "FIELDS", "LOADING", "MERGE_DTYPES", "VERIFY", "Options",
           "cli_fields", "core", "dest", "flag", "from_flags", "make_options"]
