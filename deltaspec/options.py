"""The analysis options, declared once: :class:`Options`, taken by the core entry
(:func:`deltaspec.analyze.run`) and by ``analyze``/``compare``/``spectra`` as keyword arguments.

Imports nothing heavy (no torch, numpy or pandas), so that the command line can build an
:class:`Options` while it is still only parsing arguments.

>>> Options(top_k=16).k
8
>>> make_options({"include": "q_proj"}).include
'q_proj'
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from deltaspec.errors import UsageError

MERGE_DTYPES = ("bfloat16", "float16")  # the narrow formats of the merge columns (Options.merge_dtype)


@dataclass(frozen=True)
class Options:
    """How one analysis runs. Every field has the keyword argument of the same name."""

    top_k: int | None = None  # spectral metrics over the top K values only (fair across ranks)
    k: int = 8  # subspace dimension K for similarity and amplification
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", …
    intruders: bool = False  # intruder count (with a base): a full decomposition of each W; opt-in
    include: str | None = None  # regex: only modules whose name matches (re.search)
    progress: bool = False  # a tqdm progress bar on stderr
    allow_modified_base: bool = False  # read PiSSA/OLoRA/… adapters anyway
    lora_alpha: float | None = None  # α of checkpoints that do not save it (MTL-LoRA code base)
    mtl_temperature: float | None = None  # MTL-LoRA's softmax temperature (not saved; default 1)
    shard: tuple[int, int] | None = None  # (rank, world): this process's share of the modules
    keep_spectra: bool = False  # keep every module's Spectrum in the result (core entry only)
    vectors: bool = False  # also compute the top-K singular vectors (kept with keep_spectra)
    discover_base: bool = True  # no base given: use the one the adapter's config names
    revision: str | None = None  # revision of Hub ids given without @revision
    adapter_name: str | None = None  # the adapter of a live PeftModel (default: its active one)
    merge_dtype: str = "bfloat16"  # lost_in_bf16 / bf16_merge_error: W + ΔW stored in this dtype
    heavy_tail: bool = False  # the heavy-tail α columns (ΔW's ESD; W's with a base): opt-in

    def __post_init__(self) -> None:
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise UsageError(f"top_k must be a positive integer, not {self.top_k}")
        if isinstance(self.k, bool) or self.k < 1:
            raise UsageError(f"k must be a positive integer, not {self.k}")
        if self.include is not None:
            try:
                re.compile(self.include)
            except re.error as exc:
                raise UsageError(f"include: invalid regular expression {self.include!r} "
                                 f"({exc})") from None
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


__all__ = ["FIELDS", "Options", "make_options"]
