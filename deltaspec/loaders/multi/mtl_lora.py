"""The MTL-LoRA code base's checkpoints (``pUmpKin-Co/MTL-LoRA``): ``checkpoint/final_checkpoint.pt``.

Its ``save_pretrain`` ``torch.save``\\ s every state-dict key that contains ``lora`` — no config, no
α, no temperature. The adapter class is read from each module's keys; one row of ``VARIANTS`` per
class of the code base (``<m>`` is the module path, e.g. ``model.layers.0.self_attn.q_proj``)::

    multilora  <m>.lora_A (n, r, in)  .lora_B (n, out, r)  .lora_scaling (n, out)
               ΔW = Σᵢ diag(sᵢ)·Bᵢ·Aᵢ·α/r                                      (MultiLoRALinear)
    mlora      <m>.lora_A (1, r, in)  .lora_lambdas (T, r, r) or (T, r)  .lora_B (nB, out, r)
               .lora_B_w (T, nB)  [.lora_scaler ()]
               ΔW_t = (Σ_b softmax(w_t/τ)_b·B_b)·Λ_t·A·α/r [·sigmoid(scaler)], one per task t
    moelora    see :mod:`deltaspec.loaders.multi.mtl_tasks`: one ΔW per task t      (MMOELoraLinear)
    dora       <m>.lora_A.weight  .lora_B.weight  .lora_weight_m_wdecomp.weight (out, 1)
               ΔW = m ⊙ V/‖V‖_row − W, V = W + B·A·α/r (needs the base and α)    (DoRALinear)
               magnitude only (``Wdecompose``): ΔW = (m/‖W‖_row − 1) ⊙ W
    lora       <m>.lora_A.weight (r, in)  .lora_B.weight (out, r): ΔW = B·A·α/r     (LoRALinear)

Per-task rows are named ``<parent>.tasks.<t>.<kind>`` (e.g. ``model.layers.0.self_attn.tasks.2.
q_proj``), so the layer index and module kind parse as for any other row. α is not saved: with
``lora_alpha`` unset, α/r = 1 and a note says so (scale-free metrics are exact either way).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, UnsupportedError, UsageError
from deltaspec.loaders import build
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Noted, Skipped, Source, folder_of
from deltaspec.loaders.multi import mtl_tasks, multilora
from deltaspec.loaders.multi.mtl_tasks import DEFAULT_TEMPERATURE, MtlCheckpoint
from deltaspec.loaders.sources.discovery import holds_model_weights
from deltaspec.loaders.store import TensorStore
from deltaspec.names import indexed, strip_peft_prefix
from deltaspec.options import Options

WEIGHTS = "final_checkpoint.pt"
# .pt files trainers write beside weights: never an MTL-LoRA checkpoint.
NOT_ADAPTERS = ("optimizer.pt", "scheduler.pt", "value_head.pt", "training_args.pt", "rng_state.pt",
                "scaler.pt")
_PREFIXES = ("module.",)  # DeepSpeed/DDP wrappers (the code base strips "module." on load)


def find_weights(folder: Path) -> Path | None:
    """``final_checkpoint.pt`` in ``folder`` or its ``checkpoint/``, else the folder's only ``.pt``
    — not in a model folder (a full fine-tune's ``scheduler.pt``, TRL's ``value_head.pt``) and
    not a trainer's own file."""
    for candidate in (folder / WEIGHTS, folder / "checkpoint" / WEIGHTS):
        if candidate.is_file():
            return candidate
    if not folder.is_dir() or holds_model_weights(folder):
        return None
    pts = sorted(p for p in folder.glob("*.pt") if p.name not in NOT_ADAPTERS)
    return pts[0] if len(pts) == 1 else None


def detect(folder: Source) -> bool:
    """True for a folder holding the code base's ``final_checkpoint.pt`` (or one ``.pt`` file)."""
    return isinstance(folder, Path) and find_weights(folder) is not None


def _multilora(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, Delta]:
    ctx.shape(keys, "lora_A", 3, mod)
    stacked = {part: keys[f"lora_{part}"] for part in ("A", "B", "scaling") if f"lora_{part}" in keys}
    r = ctx.store.shape(keys["lora_A"])[1]
    return {mod: multilora.stacked_delta(ctx.store, mod, stacked, ctx.scale(r), ctx.base)}


def _mlora(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, Delta]:
    one, r, d_in = ctx.shape(keys, "lora_A", 3, mod)
    n_b, d_out, r_b = ctx.shape(keys, "lora_B", 3, mod)
    tasks, n_w = ctx.shape(keys, "lora_B_w", 2, mod)
    lam = ctx.store.shape(keys["lora_lambdas"]) if "lora_lambdas" in keys else None
    if lam is None:
        raise CheckpointError(f"{ctx.source}: module {mod!r} has no lora_lambdas tensor")
    if one != 1 or r_b != r or n_w != n_b or lam not in ((tasks, r, r), (tasks, r)):
        raise CheckpointError(
            f"{ctx.source}: {mod}: lora_A {(one, r, d_in)}, lora_lambdas {lam}, lora_B "
            f"{(n_b, d_out, r_b)} and lora_B_w {(tasks, n_w)} are not (1, r, in), (T, r, r) or "
            "(T, r), (nB, out, r) and (T, nB)")
    scaler = keys.get("lora_scaler")
    if scaler is not None and math.prod(ctx.store.shape(scaler)) != 1:
        raise CheckpointError(f"{ctx.source}: tensor {scaler!r} has shape "
                              f"{ctx.store.shape(scaler)}; expected a scalar")
    s, tau = ctx.scale(r), ctx.tau()

    def mixed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(task B's (T, out, r), Λ (T, r, r), A (r, in)), every scale folded into the B's."""
        b_stored = ctx.store.get(keys["lora_B"])
        # softmax in float32, cast to lora_B's dtype: mLoRALinear.forward's own steps
        w = torch.softmax(ctx.get(keys["lora_B_w"]) / tau, dim=-1, dtype=torch.float32)
        w = w.to(b_stored.dtype).to(torch.float64)
        task_b = torch.einsum("tb,bor->tor", w, b_stored.to(torch.float64))
        lam_t = ctx.store.get(keys["lora_lambdas"]).to(torch.float64)
        lam_t = torch.diag_embed(lam_t) if lam_t.ndim == 2 else lam_t
        extra = torch.sigmoid(ctx.get(scaler).reshape(())).item() if scaler is not None else 1.0
        return task_b * (s * extra), lam_t, ctx.get(keys["lora_A"]).reshape(r, d_in)

    cache = mtl_tasks.Once(mixed)
    out = {}
    for t in range(tasks):
        def load(t: int = t) -> _delta.Factors:
            task_b, lam_t, a = cache()
            return (task_b[t] @ lam_t[t]).to(torch.float32), a

        name = indexed(mod, "tasks", t)
        out[name] = _delta.factored(name, (d_out, d_in), load, method="mtl-lora",
                                    source=ctx.source, rank=r,
                                    base=ctx.base_weight(mod, (d_out, d_in)))
    return out


def _lora(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, Delta]:
    return {mod: _factored(ctx, mod, keys, "lora")}


def _factored(ctx: MtlCheckpoint, mod: str, keys: dict[str, str], method: str) -> Delta:
    ctx.shape(keys, "lora_A.weight", 2, mod)
    ctx.shape(keys, "lora_B.weight", 2, mod)
    f = build.lora_factors(ctx.store, ctx.source, mod, keys["lora_A.weight"], keys["lora_B.weight"],
                           ctx.scale)
    return build.factored(mod, f, method=method, source=ctx.source,
                          base=ctx.base_weight(mod, f.shape))


def _dora(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, Delta]:
    """DoRALinear's merge: W′ = m / ‖V‖_row · V with V = W + B·A·α/r (V = W with Wdecompose)."""
    m_shape = ctx.shape(keys, "lora_weight_m_wdecomp.weight", 2, mod)
    factored = "lora_A.weight" in keys or "lora_B.weight" in keys
    if factored:
        lora = _factored(ctx, mod, keys, "lora")
        shape = lora.shape
        if ctx.alpha is None:
            raise UsageError(f"{ctx.source}: {mod} is a DoRA module: its ΔW depends on α "
                             "non-linearly and α is not saved; pass --lora-alpha")
    elif ctx.base is not None:
        key = ctx.base.find(mod + ".weight")
        if key is None:
            raise CheckpointError(f"{ctx.base.folder}: base has no weight for module {mod!r}")
        stored = ctx.base.store.shape(key)
        shape = (stored[0], math.prod(stored[1:]))
    else:
        shape = (m_shape[0], 0)
    if m_shape != (shape[0], 1):
        raise CheckpointError(f"{ctx.source}: tensor {keys['lora_weight_m_wdecomp.weight']!r} has "
                              f"shape {m_shape}; expected ({shape[0]}, 1)")
    if ctx.base is None:
        raise UsageError(f"{ctx.source}: {mod} is a DoRA module; its update depends on the base "
                         "weight, so pass --base")
    return {mod: build.dora(mod, shape, lora.factors if factored else None,
                            ctx.base.oriented(mod, shape),
                            lambda: ctx.get(keys["lora_weight_m_wdecomp.weight"]), axis=1,
                            source=ctx.source)}


def _unsupported(ctx: MtlCheckpoint, mod: str, keys: dict[str, str]) -> dict[str, Delta]:
    raise UnsupportedError(f"{ctx.source}: {mod}: the merged-projection MTL-LoRA layer "
                           f"(mLoRAMergedLinear: {', '.join(sorted(keys))}) is not supported")


Builder = Callable[[MtlCheckpoint, str, dict[str, str]], dict[str, Delta]]

# (variant, does this module's set of parts belong to it, builder): the first match builds it.
VARIANTS: list[tuple[str, Callable[[set[str]], bool], Builder]] = [
    ("mlora_merged", lambda p: any(x.startswith(("lora_B_q", "lora_B_k", "lora_B_v")) for x in p),
     _unsupported),
    ("mlora", lambda p: "lora_B_w" in p or "lora_lambdas" in p, _mlora),
    ("multilora", lambda p: bool({"lora_scaling", "lora_A", "lora_B"} & p), _multilora),
    ("moelora", mtl_tasks.is_moelora, mtl_tasks.moelora),
    ("dora", lambda p: "lora_weight_m_wdecomp.weight" in p, _dora),
    ("lora", lambda p: "lora_A.weight" in p or "lora_B.weight" in p, _lora),
]


def _group(store: TensorStore, skipped: Skipped) -> dict[str, dict[str, str]]:
    """Module → part (``lora_A``, ``lora_B.weight``, …) → stored key."""
    parts: dict[str, dict[str, str]] = {}
    for key in store:
        name = strip_peft_prefix(next((key[len(p):] for p in _PREFIXES if key.startswith(p)), key))
        at = name.find(".lora_")
        if at <= 0:
            skipped.append((key, "not an adapter tensor of the MTL-LoRA code base"))
            continue
        parts.setdefault(name[:at], {})[name[at + 1:]] = key
    return parts


def load(folder: Source, base: Checkpoint | None, opts: Options,
         skipped: Skipped) -> dict[str, Delta]:
    """Every module's ΔW (one per task for MTL-LoRA / MoELoRA) in a ``final_checkpoint.pt``;
    notes say which unsaved settings (α, temperature) were assumed."""
    folder = folder_of(folder, "MTL-LoRA checkpoints")
    weights = find_weights(folder)
    if weights is None:
        raise CheckpointError(f"{folder}: no {WEIGHTS} here or in {folder / 'checkpoint'}")
    for what, value in (("lora_alpha", opts.lora_alpha), ("mtl_temperature", opts.mtl_temperature)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{what} must be a positive number, not {value!r}")
    store = TensorStore.from_files([weights])
    ctx = MtlCheckpoint(store, str(weights), base, opts.lora_alpha, opts.mtl_temperature)
    out: dict[str, Delta] = {}
    for mod, keys in _group(store, skipped).items():
        variant = next((v for v in VARIANTS if v[1](set(keys))), None)
        if variant is None:
            raise CheckpointError(f"{weights}: module {mod!r} holds {', '.join(sorted(keys))}: "
                                  "not an adapter layer of the MTL-LoRA code base")
        out.update(variant[2](ctx, mod, keys))
    if not out:
        raise CheckpointError(f"{weights}: holds no MTL-LoRA adapter tensors (keys with 'lora')")
    return Noted(out, _notes(ctx))


def _notes(ctx: MtlCheckpoint) -> list[str]:
    notes = []
    if "alpha" in ctx.uses:
        notes.append(f"{ctx.source} does not save α: norms are reported with α/r = 1 (pass "
                     "--lora-alpha A); scale-free metrics (entropies, ranks, shares, "
                     "similarities) are exact anyway")
    if "temperature" in ctx.uses:
        notes.append(f"{ctx.source} does not save the MTL-LoRA temperature: task ΔWs mix the "
                     f"lora_B heads with softmax(lora_B_w / {DEFAULT_TEMPERATURE:g}), the code "
                     "base's default (its scripts train with 0.1; pass --mtl-temperature T)")
    return notes
