"""Updates over training: the checkpoints of one run → one row per (step, module).

:func:`trajectory` (and ``deltaspec trajectory``) takes a run folder — the ``checkpoint-N``
sub-folders a Hugging Face ``Trainer`` writes, in any format :func:`deltaspec.load` reads — or an
explicit list of ``STEP=PATH`` items, orders the checkpoints by step and gives a tidy frame: the
step, the checkpoint, every column of ``deltaspec.analyze`` for that checkpoint, and the drift
columns of :data:`DRIFT` (declared here, once).

How it runs: the final checkpoint is read first and, when its modules are factored (LoRA,
MultiLoRA, …), its factors are kept in memory (adapter-sized); every checkpoint is then streamed
once through the core loop's comparison with the final one (:func:`deltaspec.loop.run`):
its metrics are that run's ``_a`` columns (the same functions as ``analyze``), cosine and φ to the
final are the run's pairwise columns, and φ to the previous checkpoint comes from the top-K
vectors kept from the previous step. A dense final update (a full fine-tune) is not held in
memory: it is read again for each pair, one tensor at a time.

A checkpoint that cannot be read or does not match the others (modules, shapes, base) is an error
naming it; with ``skip_bad`` it is left out and listed in ``attrs["skipped_checkpoints"]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from deltaspec import columns as cols
from deltaspec import metrics as M
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, DeltaspecError, ShapeError, UsageError
from deltaspec.options import Options, make_options

STEP_NAME = re.compile(r"^(?:checkpoint|step|global_step)[-_]?(\d+)$")
# The drift columns, declared once: name → definition (README and --help read them from here).
DRIFT = {
    "cosine_final": "⟨ΔW_t, ΔW_final⟩_F / (‖ΔW_t‖_F ‖ΔW_final‖_F)",
    "phi_final_left": "φ(K, K) of the top-K left singular vectors of ΔW_t and ΔW_final",
    "phi_final_right": "φ(K, K) of the top-K right singular vectors of ΔW_t and ΔW_final",
    "phi_prev_left": "φ(K, K) of the left singular vectors, to the previous checkpoint",
    "phi_prev_right": "φ(K, K) of the right singular vectors, to the previous checkpoint",
    "norm_change": "(‖ΔW_t‖_F − ‖ΔW_prev‖_F) / ‖ΔW_prev‖_F, to the previous checkpoint",
}
_FROM_PAIR = {"cosine": "cosine_final", "subspace_sim_left": "phi_final_left",
              "subspace_sim_right": "phi_final_right"}
LEAD = ("step", "checkpoint")
_CONFIGS = ("adapter_config.json", "multilora_config.json")


class MismatchError(CheckpointError):
    """Checkpoints that are not of one run: another format, base, module set or shape (never
    skipped by ``skip_bad``: the run itself is wrong)."""


@dataclass(frozen=True)
class Point:
    """One checkpoint of a run: its step, where it is, and how messages name it."""

    step: int
    source: Any
    name: str


@dataclass(frozen=True)
class Trajectory:
    """What :func:`run` returns: ``table`` (one row per (step, module)), the checkpoints used,
    those left out with ``skip_bad`` (name, reason) and the loaders' notes."""

    table: pd.DataFrame
    points: list[Point]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def step_of(name: str) -> int | None:
    """The step a checkpoint folder's name carries, or None.

    >>> step_of("checkpoint-500"), step_of("step_20"), step_of("final")
    (500, 20, None)
    """
    m = STEP_NAME.match(name)
    return int(m.group(1)) if m else None


def _item(item: Any) -> Point:
    """``STEP=PATH``, ``(step, source)`` or a path whose name carries the step."""
    if isinstance(item, tuple) and len(item) == 2:
        step, source = item
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise UsageError(f"step {step!r} of {source!r}: expected an integer ≥ 0")
        name = str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"
        return Point(step, source, name)
    text = str(item)
    head, eq, tail = text.partition("=")
    if eq and head.strip().isdigit() and not Path(text).exists():
        return Point(int(head), tail, tail)
    step = step_of(Path(text).name)
    if step is None:
        raise UsageError(f"{text}: cannot read a step from the name (write STEP={text})")
    return Point(step, text, text)


def points(run: Any) -> list[Point]:
    """The checkpoints of ``run`` ordered by step: a folder of ``checkpoint-N`` (``step-N``,
    ``global_stepN``) sub-folders, a mapping step → checkpoint, or a list of ``STEP=PATH`` items,
    ``(step, checkpoint)`` pairs or paths whose names carry the step. Checkpoints may be folders,
    Hub ids or live objects (the latter two with explicit steps)."""
    if isinstance(run, (str, Path)) and Path(run).is_dir():
        folder = Path(run)
        found = [Point(s, c, str(c)) for c in sorted(folder.iterdir())
                 if (s := step_of(c.name)) is not None and c.is_dir()]
        if not found:
            raise CheckpointError(f"{folder}: no checkpoint folders (checkpoint-N) in it; list "
                                  "the checkpoints as STEP=PATH instead")
    elif isinstance(run, Mapping):
        found = [_item((s, c)) for s, c in run.items()]
    elif isinstance(run, (str, Path)):
        if "=" not in str(run):
            raise CheckpointError(f"{run}: no such folder")
        found = [_item(run)]
    elif isinstance(run, Sequence):
        found = [_item(x) for x in run]
    else:
        raise UsageError(f"run: expected a folder or a list of checkpoints, not {type(run).__name__}")
    if not found:
        raise UsageError("run: no checkpoints given")
    found.sort(key=lambda p: p.step)
    for a, b in zip(found, found[1:], strict=False):
        if a.step == b.step:
            raise UsageError(f"step {a.step} is given twice ({a.name} and {b.name})")
    return found


def base_named(source: Any) -> str | None:
    """The ``base_model_name_or_path`` an adapter folder's config names (None otherwise)."""
    if not isinstance(source, (str, Path)):
        return None
    for name in _CONFIGS:
        path = Path(source) / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                return None
            return str(value) if value else None
    return None


def pinned(deltas: Mapping[str, Delta]) -> dict[str, Delta]:
    """``deltas`` with every factored module's factors read now and kept in memory (the final
    checkpoint's, reused by every pair); other modules stay lazy."""
    out = {}
    for name, d in deltas.items():
        if d.is_factored:
            d = dataclasses.replace(d, _factors=_kept(d.factors()))
        out[name] = d
    return out


def _kept(factors: tuple[Any, Any]) -> Callable[[], tuple[Any, Any]]:
    return lambda: factors


def _load(p: Point, base: Any, opts: Options) -> Any:
    """One checkpoint read: located and its base decided as the plan does (the one loading call)."""
    from deltaspec.loaders.registry import load_side
    from deltaspec.plan import side

    return load_side(side(p.source, base, opts), opts)


def _vectors(sp: Any, k: int) -> tuple[Any, Any]:
    """The top-min(K, numerical rank) singular vectors (U, V) of a spectrum, on the CPU, as the
    core entry's pairwise columns take them."""
    r = min(k, M.numerical_rank(sp.values, sp.shape))
    return sp.U[:, :r].cpu(), sp.V[:, :r].cpu()


def _rows(p: Point, result: Any, prev: dict[str, Any], columns: list[str],
          k: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of checkpoint ``p`` from its comparison with the final one; ``prev``: module →
    (U, V, ‖ΔW‖_F) of the previous checkpoint. Returns the rows and this step's ``prev``."""
    rows, now = [], {}
    for rec in result.rows.rows:
        name = rec["module"]
        row: dict[str, Any] = {"step": p.step, "checkpoint": p.name}
        row |= {c: rec[c] if c in rec else rec.get(f"{c}_a") for c in columns}
        row |= {new: rec.get(old) for old, new in _FROM_PAIR.items()}
        u, v = _vectors(result.spectra[name][0], k)
        fro = float(row["fro_norm"])
        now[name] = (u, v, fro)
        if name in prev:
            pu, pv, pfro = prev[name]
            row |= {"phi_prev_left": M.subspace_similarity(u, pu),
                    "phi_prev_right": M.subspace_similarity(v, pv),
                    "norm_change": (fro - pfro) / pfro if pfro > 0 else math.nan}
        rows.append(row)
    return rows, now


def _named(p: Point, exc: BaseException) -> CheckpointError:
    if isinstance(exc, MismatchError):
        return exc
    text = str(exc) if isinstance(exc, DeltaspecError) else f"{type(exc).__name__}: {exc}"
    return CheckpointError(f"checkpoint {p.name} (step {p.step}): {text}")


def _check_same(p: Point, deltas: Mapping[str, Delta], final: Point,
                final_deltas: Mapping[str, Delta]) -> None:
    """Checkpoints of one run: same format, same base, same modules (shapes: the core entry)."""
    fmt, ffmt = getattr(deltas, "format", None), getattr(final_deltas, "format", None)
    if fmt != ffmt:
        raise MismatchError(f"checkpoint {p.name}: format {fmt} but {ffmt} in {final.name}")
    b, fb = base_named(p.source), base_named(final.source)
    if b and fb and b != fb:
        raise MismatchError(f"checkpoint {p.name}: base {b} but {fb} in {final.name}")
    if len(deltas) != len(final_deltas):
        raise MismatchError(f"checkpoint {p.name}: {len(deltas)} modules but "
                              f"{len(final_deltas)} in {final.name}")


def _final(pts: list[Point], base: Any, opts: Options, skip_bad: bool,
           bad: list[tuple[str, str]]) -> tuple[Point, Any, dict[str, Delta]]:
    """The last readable checkpoint: (its point, its loaded deltas, those deltas pinned)."""
    while pts:
        p = pts[-1]
        try:
            loaded = _load(p, base, opts)
            return p, loaded, pinned(loaded)
        except (DeltaspecError, OSError, RuntimeError, ValueError) as exc:
            if not skip_bad:
                raise _named(p, exc) from None
            bad.append((p.name, str(_named(p, exc))))
            pts.pop()
    raise CheckpointError("no checkpoint of the run could be read: " + "; ".join(r for _, r in bad))


def run(pts: Sequence[Point], base: Any = None, opts: Options | None = None, *,
        skip_bad: bool = False) -> Trajectory:
    """The trajectory of already listed checkpoints (:func:`points`); see the module docstring."""
    from deltaspec.loop import run as analyze_run

    opts = dataclasses.replace(opts or Options(), keep_spectra=True, vectors=True)
    todo, bad = list(pts), []  # type: list[Point], list[tuple[str, str]]
    final, final_loaded, final_deltas = _final(todo, base, opts, skip_bad, bad)
    rows: list[dict[str, Any]] = []
    prev: dict[str, Any] = {}
    notes: list[str] = []
    columns: list[str] | None = None
    for p in todo:
        try:
            deltas = final_deltas if p is final else _load(p, base, opts)
            if p is not final:
                _check_same(p, deltas, final, final_loaded)
            result = analyze_run(deltas, final_deltas, opts, names=(p.name, final.name))
            if result.only_a or result.only_b:
                extra = (result.only_a or result.only_b)[0]
                raise MismatchError(f"module {extra} is in only one of {p.name} and {final.name}")
            columns = columns or cols.analyze_columns(result.with_base, opts.heavy_tail)
            got, now = _rows(p, result, prev, columns, opts.k)
        except (DeltaspecError, OSError, RuntimeError, ValueError) as exc:
            if not skip_bad or isinstance(exc, (ShapeError, MismatchError)):
                raise _named(p, exc) from None
            bad.append((p.name, str(_named(p, exc))))
            continue
        rows += got
        prev = now
        notes += [n for n in result.notes if n not in notes]
    used = [p for p in todo if p.name not in {n for n, _ in bad}]
    table = cols.frame(rows, [*LEAD, *(columns or cols.analyze_columns(False, opts.heavy_tail)),
                              *DRIFT])
    table["step"] = table["step"].astype("int64")
    table["checkpoint"] = table["checkpoint"].astype("string")
    return Trajectory(table, used, bad, notes)


def trajectory(run_dir: Any, base: Any = None, *, skip_bad: bool = False,
               **options: Any) -> pd.DataFrame:
    """One row per (step, module) over the checkpoints of a training run.

    Args:
        run_dir: a run folder (its ``checkpoint-N`` sub-folders), a mapping step → checkpoint,
            or a list of ``STEP=PATH`` strings / ``(step, checkpoint)`` pairs.
        base: the base model (needed for full fine-tunes; as :func:`deltaspec.analyze`).
        skip_bad: leave out checkpoints that fail to load (listed in
            ``attrs["skipped_checkpoints"]``) instead of stopping at the first.
        **options: :class:`~deltaspec.options.Options` fields (``k``: the K of φ).

    Columns: ``step``, ``checkpoint``, every column of ``analyze``, then :data:`DRIFT`.
    """
    opts = make_options(options, public=True)
    result = run(points(run_dir), base, opts, skip_bad=skip_bad)
    df = result.table
    df.attrs["skipped_checkpoints"] = list(result.skipped)
    df.attrs["notes"] = list(result.notes)
    df.attrs["k"] = opts.k
    return df


LOG = "trajectory.csv"  # a training run's log: beside its final checkpoint (deltaspec train)


def write_log(run_out: str | Path, checkpoints: str | Path, base: Any = None,
              top_k: int | None = None) -> Path | None:
    """The trajectory of the log-point checkpoints in ``checkpoints`` (over the top ``top_k``
    singular values, noted in a ``top_k`` column) written to ``run_out/trajectory.csv``, as
    ``deltaspec train`` and ``deltaspec demo`` log it; None when there are no checkpoints."""
    from deltaspec.output import write_atomic

    if not Path(checkpoints).is_dir() or not any(step_of(p.name) is not None
                                                 for p in Path(checkpoints).iterdir()):
        return None
    df = trajectory(checkpoints, base, top_k=top_k, discover_base=base is None)
    df["top_k"] = top_k
    target = Path(run_out) / LOG
    write_atomic(target, df.to_csv(index=False))
    return target


__all__ = ["DRIFT", "LOG", "MismatchError", "Point", "Trajectory", "base_named", "pinned", "points",
           "run", "step_of", "trajectory", "write_log"]
