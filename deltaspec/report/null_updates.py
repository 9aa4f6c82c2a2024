"""The null updates of one checkpoint, module by module: the I/O side of :mod:`.nulls`.

For an update loaded as ``{module: Delta}``, :func:`null_spectra` gives per null kind the σ of
every module's null (see :mod:`deltaspec.report.nulls` for what each null is):

- ``random``: every update (same shape, same structural rank);
- ``projected``: a full-rank (dense) update, when a rank ``r`` to project on is given;
- ``equalised``: a MultiLoRA update read from its folder (the stacked Aᵢ, Bᵢ and sᵢ are read
  from ``multilora_model.safetensors``; a live object has no folder and gets none).

Shared by the democracy report (:mod:`deltaspec.report.data`) and the sweep
(``analyses/democracy_sweep.py``), so that both compute the same nulls.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltaspec.delta import Delta
from deltaspec.names import strip_peft_prefix
from deltaspec.report import nulls as N

NULL_KINDS = ("random", "projected", "equalised")
NULL_TITLES = {
    "random": "a random update of the same shape and structural rank",
    "projected": "the full FT's own update projected on a random rank-r input subspace (ΔW·AᵀA)",
    "equalised": "the same MultiLoRA factors with equalised |sᵢ|",
}


def multilora_parts(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
    """module → (A (n, r, in), B (n, out, r), s (n,) or (n, out), α/r) of a MultiLoRA folder
    ({} when ``folder`` is not one)."""
    from safetensors import safe_open

    from deltaspec.loaders.multi import multilora as ML

    folder = Path(folder)
    if not (folder / ML.CONFIG).is_file() or not (folder / ML.WEIGHTS).is_file():
        return {}
    config = json.loads((folder / ML.CONFIG).read_text())
    scale = float(config.get("lora_alpha", config.get("alpha"))) / float(config["r"])
    parts: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(folder / ML.WEIGHTS), framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
            m = ML._KEY.match(strip_peft_prefix(key))
            if m is not None:
                t = fh.get_tensor(key).to(torch.float64).numpy()
                parts.setdefault(m["mod"], {})[m["part"]] = t
    return {mod: (p["A"], p["B"], p["scaling"], scale) for mod, p in parts.items()
            if {"A", "B", "scaling"} <= set(p)}


def null_spectra(deltas: Mapping[str, Delta], seed: int = 0, *, project_rank: int | None = None,
                 source: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """null kind → module → σ of that module's null (only the kinds that apply; see the module
    docstring). ``seed`` seeds every random draw (with the module name; the random null is drawn
    once per shape and rank, which is all its distribution depends on)."""
    out: dict[str, dict[str, np.ndarray]] = {"random": {}}
    parts = multilora_parts(Path(source)) if isinstance(source, str | Path) else {}
    drawn: dict[tuple[tuple[int, int], int], np.ndarray] = {}  # one draw per shape and rank
    for name, d in deltas.items():
        key = (d.shape, d.rank_bound)
        if key not in drawn:
            drawn[key] = N.random_values(d.shape, d.rank_bound, seed, f"{d.shape}:{d.rank_bound}")
        out["random"][name] = drawn[key]
        if project_rank is not None and not d.is_factored and d.rank_bound > project_rank:
            dense = d.dense(torch.float64).numpy()
            out.setdefault("projected", {})[name] = N.projected_values(dense, project_rank, seed,
                                                                       name)
        if d.method == "multilora" and name in parts:
            a, b, s, scale = parts[name]
            out.setdefault("equalised", {})[name] = N.equalised_values(a, b, s, scale)
            out.setdefault("scaling_spread", {})[name] = np.array([N.scaling_spread(s)])
    return out


__all__ = ["NULL_KINDS", "NULL_TITLES", "multilora_parts", "null_spectra"]
