"""Full weights inside a PEFT adapter: ``modules_to_save`` and ``trainable_token_indices``.

Both store new *values*, not updates, so they become deltas only against a base (``saved − base``);
without one they are listed in ``.skipped``. GPT-2 Conv1D weights are canonicalised to (out, in).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from deltaspec import delta as _delta
from deltaspec.delta import Delta
from deltaspec.errors import CheckpointError, ShapeError
from deltaspec.loaders import schema
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.loaders.contract import Skipped, Source
from deltaspec.loaders.peft import common as peft_common
from deltaspec.loaders.peft import config as peft_config
from deltaspec.loaders.peft.common import Adapter
from deltaspec.loaders.peft.keys import Groups
from deltaspec.names import has_conv1d, is_conv1d, match_key

NO_BASE = "{what}; pass --base to analyse it"


def full_weights(ctx: Adapter, modules: dict[str, dict[str, str]]) -> dict[str, Delta]:
    """modules_to_save (module → {"weight": key, "bias": key}): ΔW = saved − base."""
    out: dict[str, Delta] = {}
    for name, keys in modules.items():
        key = keys.get("weight")
        if key is None or len(ctx.store.shape(key)) < 2:
            for leaf_key in keys.values():
                ctx.skipped.append((leaf_key, f"{len(ctx.store.shape(leaf_key))}-D tensor (a trained "
                                              "bias or norm weight, not a matrix)"))
            continue
        if ctx.base is None:
            ctx.skipped.append((key, NO_BASE.format(what="full weight (modules_to_save)")))
            continue
        d = _full_weight(ctx, name, key, keys.get("bias"))
        if d is not None:
            out[name] = d
    return out


def _full_weight(ctx: Adapter, name: str, key: str, bias_key: str | None) -> Delta | None:
    assert ctx.base is not None
    bs = ctx.base
    base_key = bs.find(name + ".weight")
    if base_key is None:
        ctx.skipped.append((key, "full weight (modules_to_save) not in the base"))
        return None
    stored, base_stored = ctx.store.shape(key), bs.store.shape(base_key)
    if stored != base_stored:
        raise ShapeError(f"{ctx.source}: tensor {key!r} has shape {stored} but the base's "
                         f"{base_key!r} in {bs.store.file_of(base_key)} has {base_stored}")
    conv = len(stored) == 2 and has_conv1d(bs.model_type) and is_conv1d(bs.model_type, name)
    rows, cols = stored[0], math.prod(stored[1:])
    shape = (cols, rows) if conv else (rows, cols)

    def canonical(w: torch.Tensor) -> torch.Tensor:
        return w.T if conv else w.reshape(shape)

    def load() -> torch.Tensor:
        return canonical(ctx.get(key) - bs.tensor(base_key))

    return _delta.dense(name, shape, load, method="modules_to_save", source=ctx.source,
                        base=lambda: canonical(bs.tensor(base_key)),
                        bias=trained_bias(ctx, name, bias_key, shape[0]))


def trained_bias(ctx: Adapter, name: str, bias_key: str | None,
                 out: int) -> Callable[[], torch.Tensor] | None:
    """A bias the adapter saved as a value (modules_to_save, or LoRA's ``bias="all"``): saved − base.

    None when there is no such bias; listed in ``.skipped`` when there is no base to subtract.
    """
    if bias_key is None:
        return None
    if ctx.base is None:
        ctx.skipped.append((bias_key, NO_BASE.format(what="trained bias")))
        return None
    base_key = ctx.base.find(name + ".bias")
    if base_key is None:
        ctx.skipped.append((bias_key, "trained bias not in the base"))
        return None
    shapes = ctx.store.shape(bias_key), ctx.base.store.shape(base_key)
    if shapes[0] != shapes[1] or shapes[0] != (out,):
        raise ShapeError(f"{ctx.source}: tensor {bias_key!r} has shape {shapes[0]} but the base's "
                         f"{base_key!r} has {shapes[1]} (module output {out})")
    base = ctx.base
    return lambda: ctx.get(bias_key) - base.tensor(base_key)


def trainable_tokens(ctx: Adapter, modules: dict[str, str]) -> dict[str, Delta]:
    """trainable_token_indices: rows ``idx`` of an embedding take the saved values.

    ΔW is zero except rows idx, where it is saved − base (PEFT merges with ``index_copy``).
    """
    out: dict[str, Delta] = {}
    for name, key in modules.items():
        if ctx.base is None:
            ctx.skipped.append((key, NO_BASE.format(what="trainable token rows")))
            continue
        is_input = match_key(name).split(".")[-1] in ("embed_tokens", "wte", "embed_in",
                                                      "word_embeddings", "shared")
        idx = peft_config.token_indices(ctx.config_path, ctx.config, name, is_input)
        base_key = ctx.base.find(name + ".weight")
        if base_key is None:
            raise CheckpointError(f"{ctx.base.folder}: base has no weight for module {name!r}")
        shape = ctx.base.store.shape(base_key)
        saved = ctx.store.shape(key)
        if len(shape) != 2 or saved != (len(idx), shape[1]) or max(idx) >= shape[0] or min(idx) < 0:
            raise ShapeError(f"{ctx.source}: tensor {key!r} of shape {saved} does not fit "
                             f"{len(idx)} token rows of the base's {base_key!r} {shape}")
        out[name] = _tokens_delta(ctx, name, key, base_key, idx, (shape[0], shape[1]))
    return out


def _tokens_delta(ctx: Adapter, name: str, key: str, base_key: str, idx: list[int],
                  shape: tuple[int, int]) -> Delta:
    assert ctx.base is not None
    base = ctx.base
    rows = torch.tensor(idx, dtype=torch.long)

    def load() -> torch.Tensor:
        w = base.tensor(base_key)
        return torch.zeros(shape).index_copy(0, rows, ctx.get(key) - w[rows])

    return _delta.dense(name, shape, load, method="trainable_tokens", source=ctx.source,
                        base=lambda: base.tensor(base_key))


ModuleFn = Callable[[Adapter, Checkpoint | None, str, dict[str, str]], Delta]


def load_modules(folder: Source, base: Checkpoint | None, skipped: Skipped, *, parts: tuple[str, ...],
                 what: str, module: ModuleFn, needs_base: str | None = None,
                 config_schema: schema.Schema | None = None) -> dict[str, Delta]:
    """The body every simple PEFT loader shares: open the adapter, require the base (when
    ``needs_base`` says why), group the keys by ``parts``, one ``module(ctx, base, name, keys)``
    per adapted module, then :func:`finish`."""
    ctx = peft_common.open_adapter(folder, base, skipped, config_schema)
    groups = peft_common.group(ctx, parts)
    matching(ctx, groups, what)  # before asking for a base: a wrong peft_type says so first
    bs = peft_common.require_base(ctx, needs_base) if needs_base else None
    out = {name: module(ctx, bs, name, keys) for name, keys in groups.parts()}
    return finish(ctx, out, groups, what)


def finish(ctx: Adapter, out: dict[str, Delta], groups: Groups, what: str, *,
           require: bool = True) -> dict[str, Delta]:
    """Add an adapter's full weights (modules_to_save, base layers saved without an adapter on
    them, trainable token rows) to the adapted modules' deltas ``out``; list every other key in
    ``.skipped``. ``require``: an adapter with no ``what`` module at all is refused (its
    peft_type is likely wrong)."""
    if require:
        matching(ctx, groups, what)
    for name, keys in groups.base_layer.items():
        if name not in out:  # a base layer without an adapter on it is loaded as a full weight
            groups.full.setdefault(name, keys)
    for name, d in (full_weights(ctx, groups.full) | trainable_tokens(ctx, groups.tokens)).items():
        if name in out:
            raise CheckpointError(f"{ctx.source}: module {name!r} holds both {what} tensors and a "
                                  f"{d.method} update")
        out[name] = d
    ctx.skipped.extend((key, f"not a {what} tensor deltaspec knows") for key in groups.other)
    if not out and not ctx.skipped:
        raise CheckpointError(f"{ctx.source}: the adapter holds no {what} tensors")
    return out


def matching(ctx: Adapter, groups: Groups, what: str) -> None:
    """A one-line error when the adapter holds no ``what`` tensor at all: its config's
    peft_type does not match its tensors."""
    if not groups.modules:
        first = next(iter(ctx.store.keys()), "")
        raise CheckpointError(f"{ctx.config_path}: the config's peft_type "
                              f"{ctx.config.get('peft_type')!r} does not match its tensors (no "
                              f"{what} tensor in {ctx.source}; the first key is {first!r})")


def module_bias(ctx: Adapter, name: str, out: int) -> Callable[[], torch.Tensor] | None:
    """The trained bias of an adapted module (``bias="all"`` etc.: saved − base), or None."""
    return trained_bias(ctx, name, ctx.base_layers.get(name, {}).get("bias"), out)
