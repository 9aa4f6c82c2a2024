"""The public API of one or two updates: ``analyze``, ``compare`` and ``spectra`` — each a
request planned once (:mod:`deltaspec.plan`) and executed on the executor the plan chose
(:mod:`deltaspec.execute`); the DataFrame is built here, at the boundary
(:meth:`deltaspec.result.Analysis.frame`).

The core loop and the torch executor are :mod:`deltaspec.loop` (``run``, ``run_plan``,
``select``, ``has_base`` are re-exported here, where they used to live).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from deltaspec.engine.spectrum import Spectrum, completed
from deltaspec.execute import analyse, execute
from deltaspec.loop import has_base, run, run_plan, select
from deltaspec.options import Options, make_options
from deltaspec.plan import Request, build
from deltaspec.result import Analysis

if TYPE_CHECKING:
    import pandas as pd


def _public(result: Analysis, opts: Options) -> pd.DataFrame:
    """The table the public functions return; skipped tensors and one-sided modules in ``attrs``
    (informational: the library itself never reads them back), and the singular values the
    figures draw (:mod:`deltaspec.frames`)."""
    from deltaspec.frames import attach

    df = attach(result.frame(), result.sigmas, opts.k)
    df.attrs["skipped"] = list(result.skipped)
    df.attrs["notes"] = list(result.notes)
    if result.only_a or result.only_b:
        df.attrs["only_a"], df.attrs["only_b"] = list(result.only_a), list(result.only_b)
    return df


def run_paths(a: Any, b: Any = None, base: Any = None, opts: Options | None = None, *,
              config: Any = None) -> Analysis:
    """Plan and execute the update(s) at ``a`` (and ``b``) — with ``compare``'s rule: two full
    checkpoints and no base are the one update ΔW = b − a. Each is a folder, a Hub id or a live
    object (:func:`deltaspec.load`); ``config``: the adapter config of an adapter state dict ``a``."""
    return analyse((a,) if b is None else (a, b), base, opts, config=config)


def analyze(path: Any, base: Any = None, *, config: Any = None, **options: Any) -> pd.DataFrame:
    """One row of metrics per module of the update at ``path`` (options: :class:`Options`).

    ``path``: a folder, a Hub id ``org/name[@rev]``, or a live object — a PeftModel, an
    ``nn.Module`` or state dict of a full model (with ``base``), a PEFT adapter state dict (with
    ``config``). Columns are defined in :mod:`deltaspec.columns`: identity (module, layer, kind,
    method, shape, rank_bound), every spectral metric, and with a base the base-relative ones.
    The singular values travel in ``df.attrs["spectra"]`` for :mod:`deltaspec.plots`.
    """
    opts = make_options(options, public=True)
    return _public(analyse((path,), base, opts, config=config), opts)


def compare(a: Any, b: Any, base: Any = None,
            **options: Any) -> pd.DataFrame:
    """One row per module common to updates ``a`` and ``b``: both sides' metrics (suffixes
    ``_a``/``_b``) and the pairwise ones (cosine, subspace similarity at K, principal angles).

    Each side is an adapter folder, or a full checkpoint (then ``base`` is required). When both
    are full checkpoints and no base is given, the update is ΔW = b − a, analysed like ``analyze``.
    """
    opts = make_options(options, public=True)
    return _public(analyse((a, b), base, opts), opts)


def spectra(path: Any, base: Any = None, k: int | None = None,
            vectors: bool = False, **options: Any) -> dict[str, Spectrum]:
    """Module name → :class:`Spectrum` of the update at ``path`` (values, and top-k vectors)."""
    opts = make_options(options, public=True)
    # k=None with vectors: every vector (the engine's -1); else the top k values (and vectors)
    opts = dataclasses.replace(opts, vectors=vectors, k=opts.k if k is None else k,
                               keep_spectra=True)  # spectra: the torch executor (the plan says so)
    out = execute(build(Request((path,), base, opts)), metrics=False,
                  vectors_k=-1 if (vectors and k is None) else None).spectra
    if k is None:
        return out
    return {n: completed(Spectrum(sp.values[:k], sp.shape, sp.route, sp.U, sp.V))
            for n, sp in out.items()}


__all__ = ["Analysis", "Options", "analyze", "compare", "has_base", "run", "run_paths", "run_plan", "select",
           "spectra"]
