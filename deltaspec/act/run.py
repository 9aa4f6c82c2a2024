"""``compress``, ``extract`` and the rank suggestions: load once, truncate module by module, write.

The module loop (:func:`act`) streams one module at a time — its tensors are read, truncated
(:mod:`deltaspec.act.truncate`) and dropped; only the kept factors, rounded to the saved dtype,
stay — and under ``torchrun`` each rank takes a share of the modules by cost and rank 0 gathers
the factors and writes (:mod:`deltaspec.engine.distributed`, as ``analyze`` does).

What is not written (a note says which, ``df.attrs["notes"]``): embeddings and ``lm_head`` —
mergekit's ``extract_lora`` keeps them out of the LoRA too (it saves them whole, as
``modules_to_save``, unless ``--embed-lora``); here they are left out rather than copied whole
(a vocabulary-sized full copy defeats a small adapter; the base's own rows are used), and the
note says so — full ``modules_to_save``/trainable-token copies, and 1-D tensors (norms, biases:
the loaders do not yield them as updates). Routed mixtures (MoE-LoRA experts) are refused: no
single ΔW exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deltaspec.act import table
from deltaspec.act.truncate import params_in, rounded, saved_error, truncate
from deltaspec.act.writer import check_out, write_folder
from deltaspec.delta import Delta
from deltaspec.engine import distributed
from deltaspec.errors import UnsupportedError, UsageError
from deltaspec.metrics.ranks import Policy, parse_policy
from deltaspec.names import kind_of
from deltaspec.options import Options, make_options
from deltaspec.output import Rows

if TYPE_CHECKING:
    import pandas as pd

ROUTED = ("lora-moe", "mixlora")  # formats whose update depends on the input (a router)
EMBEDDINGS = frozenset({"embed_tokens", "wte", "wpe", "lm_head", "embed_out", "embed_in",
                        "word_embeddings", "position_embeddings", "shared"})
NOT_DELTAS = ("modules_to_save", "trainable_tokens")  # full copies of a weight, not updates
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


@dataclass
class Acted:
    """The result of :func:`act`: rows of ``compression.csv`` (module order), the factors to
    write (modules kept at rank ≥ 1), each module's ‖ΔW‖²_F and σ, and notes."""

    rows: list[dict[str, Any]]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    energies: list[float]
    sigmas: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32

    @property
    def totals(self) -> dict[str, Any]:
        """The totals line (energy-weighted errors)."""
        return table.totals(self.rows, self.energies)

    def printable(self) -> Any:
        """The error table as the CLI prints it."""
        return table.printable(self.rows, self.totals, self.notes)


def load_deltas(path: Any, base: Any, opts: Options, config: Any = None) -> Any:
    """The one call into the loaders: ``path`` located and its base decided as the plan does
    (:func:`deltaspec.plan.side`), read with ``opts`` (:func:`~deltaspec.loaders.registry.load_side`)."""
    from deltaspec.loaders.registry import load_side
    from deltaspec.plan import side

    return load_side(side(path, base, opts, config), opts)


def selected(deltas: Mapping[str, Delta], opts: Options, notes: list[str]) -> list[str]:
    """The modules to truncate (``include`` applied); the others named in ``notes``."""
    from deltaspec import patterns

    names, skipped = [], []
    for name, d in deltas.items():
        if opts.include and not patterns.search(opts.include, name, "include"):
            continue
        if kind_of(name) in EMBEDDINGS or d.method in NOT_DELTAS:
            skipped.append(name)
        else:
            names.append(name)
    if skipped:
        notes.append(f"{len(skipped)} embedding/lm_head/modules_to_save update(s) not written "
                     f"(kept out of the LoRA, as mergekit does), e.g. {skipped[0]}")
    return names


def input_dtype(d: Delta) -> torch.dtype:
    """The dtype the input's tensors are stored in (its first factor, or the fine-tuned weight);
    float32 for anything that is not a float PEFT stores."""
    t = d._factors()[1] if d._factors is not None else d.parts()[0] if d.parts is not None \
        else d._dense() if d._dense is not None else None
    dt = getattr(t, "dtype", torch.float32)
    return dt if dt in DTYPES.values() else torch.float32


def act(deltas: Mapping[str, Delta], policy: Policy, opts: Options,
        dtype: str | torch.dtype | None = None) -> Acted:
    """Truncate every selected module of ``deltas`` with ``policy`` (see the module)."""
    notes: list[str] = list(getattr(deltas, "notes", []))
    if getattr(deltas, "format", None) in ROUTED:
        raise UnsupportedError(f"{next(iter(deltas.values())).source}: a routed mixture of LoRA "
                               "experts: a router weighs the experts per token, so no single ΔW "
                               "exists to compress")
    names = selected(deltas, opts, notes)
    if not names:
        raise UsageError(f"{next(iter(deltas.values())).source}: no module to compress "
                         "(all skipped or filtered out by --include)")
    out_dtype = _dtype(dtype) or input_dtype(deltas[names[0]])
    world = distributed.current(opts.device)
    device = world.device(opts.device) if world.distributed else opts.device

    def compute(mine: Any) -> dict[str, Any]:
        done = {}
        for (name,) in mine:
            world.poll()  # another rank failed: stop here
            done[name] = _one(deltas[name], policy, device, out_dtype)
        return done

    items: list[tuple[str, ...]] = [(n,) for n in names]
    res = compute(items) if not world.distributed else \
        distributed.run_items(world, [deltas], items, False, 0, compute)
    acted = Acted([], {}, [], {}, notes, out_dtype)
    for n in names:
        row, f, energy, sigma = res[n]
        acted.rows.append(row)
        acted.energies.append(energy)
        acted.sigmas[n] = sigma
        if f is not None:
            acted.factors[n] = f
    if not acted.factors:
        notes.append("every module kept rank 0 (ΔW = 0, or the policy kept nothing): "
                     "no adapter written, only compression.csv")
    return acted


SMALL = 1 << 22  # entries: a module this small (or factored) is solved on one CPU thread


def _one(d: Delta, policy: Policy, device: str, dtype: torch.dtype) -> tuple[Any, ...]:
    before = torch.get_num_threads()
    if d.is_factored or d.shape[0] * d.shape[1] <= SMALL:  # tiny LAPACK steps: threads only wait
        torch.set_num_threads(1)
    try:
        t = truncate(d, policy, device)
        b, a = rounded(t, dtype)
        err = saved_error(t, b, a, device)
    finally:
        torch.set_num_threads(before)
    m, n = d.shape
    row = table.row(d.name, d.rank_bound, t.rank, t.errors(), params_in(d), t.rank * (m + n), err)
    energy = float((t.sigma.astype(np.float64) ** 2).sum())
    return row, ((b, a) if t.rank else None), energy, t.sigma


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise UsageError(f"dtype {dtype!r}: choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def source_config(path: Any, base: Any) -> dict[str, Any]:
    """What the written config carries over from the input: ``base_model_name_or_path`` and
    ``task_type`` of its adapter config (a folder's, or a PeftModel's), else the base given."""
    import json

    from deltaspec.loaders.registry import resolve
    from deltaspec.loaders.sources import live

    cfg: dict[str, Any] = {}
    if live.is_peft_model(path):
        cfg = live.as_json(path.peft_config[live.active_adapter(path, None)])
    elif isinstance(path, (str, Path)):
        f = resolve(path) / "adapter_config.json"
        cfg = json.loads(f.read_text(encoding="utf-8")) if f.is_file() else {}
    keep = {k: cfg.get(k) for k in ("base_model_name_or_path", "task_type", "revision")}
    if not keep["base_model_name_or_path"] and isinstance(base, (str, Path)):
        keep["base_model_name_or_path"] = str(base)
    return keep


def finish(acted: Acted, out: Any, source: dict[str, Any], overwrite: bool) -> None:
    """Write the adapter folder and ``compression.csv`` (nothing when ``out`` is None)."""
    if out is not None:
        csv = Rows(acted.rows, list(table.COLUMNS)).csv()
        write_folder(Path(out), acted.factors, source, csv, overwrite)


def frame(acted: Acted, policy: Policy) -> pd.DataFrame:
    """The error table as a DataFrame (exactly :data:`table.COLUMNS`); ``attrs``: ``totals``,
    ``notes``, ``policy`` and ``sigmas`` (module → σ, for :func:`deltaspec.plots.act`)."""
    import pandas as pd

    df = pd.DataFrame(acted.rows, columns=list(table.COLUMNS))
    df.attrs.update(totals=acted.totals, notes=list(acted.notes), policy=policy.text,
                    sigmas=dict(acted.sigmas))
    return df


def _options(options: dict[str, Any]) -> Options:
    return make_options(options, public=True)


def compress(path: Any, rank: Any = "gd", out: Any = None, *, base: Any = None,
             dtype: Any = None, min_rank: int | None = None, max_rank: int | None = None,
             overwrite: bool = False, config: Any = None, **options: Any) -> pd.DataFrame:
    """Compress the adapter at ``path`` (a folder, a Hub id, a PeftModel, an adapter state dict
    with ``config``) to a PEFT LoRA of the ranks ``rank`` gives (an int k, a fraction τ,
    ``"gd"``, ``"mp"``; :mod:`deltaspec.metrics.ranks`), written to ``out`` unless it is None.
    ``base``: needed for DoRA, IA³, OFT and BOFT. Returns the error table (one row per module)."""
    opts, policy = _options(options), parse_policy(rank, min_rank, max_rank)
    if out is not None:
        check_out(out, overwrite)
    deltas = load_deltas(path, base, opts, config)
    if deltas.format == "full":
        raise UsageError(f"{path}: a full checkpoint, not an adapter: use extract (with its base)")
    acted = act(deltas, policy, opts, dtype)
    finish(acted, out, source_config(path, base), overwrite)
    return frame(acted, policy)


def extract(finetuned: Any, base: Any, rank: Any = "gd", out: Any = None, *, dtype: Any = None,
            min_rank: int | None = None, max_rank: int | None = None, overwrite: bool = False,
            **options: Any) -> pd.DataFrame:
    """A PEFT LoRA from the full fine-tune ``finetuned`` minus ``base`` (folders, Hub ids, or
    ``nn.Module``/state dicts), streamed one module at a time; see :func:`compress`."""
    opts, policy = _options(options), parse_policy(rank, min_rank, max_rank)
    if base is None:
        raise UsageError(f"{finetuned}: extract needs the base model (base=…, --base)")
    if out is not None:
        check_out(out, overwrite)
    deltas = load_deltas(finetuned, base, opts)
    if deltas.format != "full":
        raise UsageError(f"{finetuned}: an adapter ({deltas.format}), not a full checkpoint: "
                         "use compress")
    acted = act(deltas, policy, opts, dtype)
    finish(acted, out, source_config(None, base), overwrite)
    return frame(acted, policy)


__all__ = ["Acted", "act", "compress", "extract", "finish", "frame", "load_deltas",
           "source_config"]
