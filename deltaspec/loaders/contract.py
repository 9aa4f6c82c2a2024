"""What every format module of :mod:`deltaspec.loaders` provides (the loader contract).

A format module exposes exactly two functions::

    def detect(folder: Source) -> bool: ...
    def load(folder: Source, base: Checkpoint | None, opts: Options,
             skipped: list[tuple[str, str]]) -> dict[str, Delta]: ...

``folder`` is a :data:`Source`: a folder, or an object in memory (an adapter with its config, a
full model as a :class:`Checkpoint`) — a module claims only what it reads.
``detect`` is cheap (file names, at most a small JSON config) and claims only its own format;
``load`` returns module name → :class:`~deltaspec.delta.Delta` (lazy: no weight is read yet) and
appends (tensor, reason) to ``skipped`` for every tensor it does not turn into a delta; it may
return a :class:`Noted` dict to say something about how it read them. ``base`` is
the opened base checkpoint (``--base``) or None; a format that cannot work without it raises a
one-line error saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from deltaspec.delta import Delta
from deltaspec.errors import UsageError
from deltaspec.loaders.checkpoint import Checkpoint
from deltaspec.options import Options

Skipped = list[tuple[str, str]]


class InMemory(Protocol):
    """An adapter held in memory (:class:`deltaspec.loaders.sources.live.MemoryAdapter`): its
    config, tensors and name, and ``context(base, skipped)`` opening it like a folder."""

    config: dict[str, Any]
    source: str

    def context(self, base: Checkpoint | None, skipped: Skipped) -> Any:
        """The opened adapter (:class:`deltaspec.loaders.peft.common.Adapter`)."""
        ...


# What a format module detects and loads: a folder, an adapter in memory, or a full model in
# memory (a :class:`Checkpoint`) — one dispatch for all three (:mod:`deltaspec.loaders.registry`).
Source = Path | InMemory | Checkpoint


def folder_of(source: Source, what: str) -> Path:
    """``source`` as a folder, or a one-line error: ``what`` is read from files only."""
    if not isinstance(source, Path):
        raise UsageError(f"{getattr(source, 'source', source)}: {what} are read from a folder only")
    return source


class Noted(dict[str, Delta]):
    """A loader's result with remarks on how it was read (``.notes``, one line each, e.g. "α is
    not saved"): ``deltaspec.load`` keeps them as ``Deltas.notes`` and the CLI prints them."""

    def __init__(self, items: dict[str, Delta], notes: list[str]) -> None:
        super().__init__(items)
        self.notes = list(notes)


class FormatModule(Protocol):
    """The shape of a format module (see the module docstring)."""

    def detect(self, folder: Source) -> bool:
        """True when ``folder`` holds a checkpoint of this format."""
        ...

    def load(self, folder: Source, base: Checkpoint | None, opts: Options,
             skipped: Skipped) -> dict[str, Delta]:
        """Every module's ΔW of the checkpoint in ``folder``."""
        ...
