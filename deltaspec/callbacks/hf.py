"""``SpectralCallback``: the live monitor (:mod:`deltaspec.callbacks.monitor`) as a transformers
``TrainerCallback``.

Its scalars go through the Trainer's own ``log`` (so ``state.log_history``, the console, W&B,
TensorBoard and every other ``report_to`` integration receive them with no set-up): the
callback finds its Trainer when training begins (or is told with :meth:`set_trainer`) and moves
itself first among the callbacks. A ``fail_on`` violation sets ``should_training_stop`` (the
Trainer stops after this step, saving as it is configured to) with a one-line reason in
``stop_reason`` and a warning.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from typing import Any

from transformers import TrainerCallback

from deltaspec.callbacks.monitor import DEFAULT_EVERY, DEFAULT_METRICS, Monitor


def _find_trainer(callback: Any) -> Any:
    """The Trainer whose callback handler holds ``callback``, from the calling frames."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            handler = getattr(owner, "callback_handler", None)
            if handler is not None and any(c is callback for c in getattr(handler, "callbacks", [])):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


class SpectralCallback(TrainerCallback):
    """Every ``every`` optimiser steps, log per module kind the mean of ``metrics`` and φ to the
    previous log point (K = ``k``) of the live adapter or model; see the module docstring.

    Args:
        every: optimiser steps between log points.
        metrics: metric-table names to log (spectral or base-relative).
        k: subspace dimension of φ.
        fail_on: bounds in the gate's syntax (``{"top1_share": "<= 0.9"}``) or a rules file.
        base: the base of a full fine-tune (default: the weights when training begins).
        **options: :class:`~deltaspec.options.Options` fields (``top_k``, ``include``, …).
    """

    def __init__(self, every: int = DEFAULT_EVERY, metrics: Sequence[str] = DEFAULT_METRICS,
                 k: int = 8, fail_on: Any = None, base: Any = None, **options: Any) -> None:
        self.monitor = Monitor(every, metrics, k, fail_on, base, **options)
        self.stop_reason: str | None = None
        self._trainer: Any = None

    def set_trainer(self, trainer: Any) -> None:
        """Log through ``trainer.log`` (found by itself when training begins)."""
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None,
                       **kwargs: Any) -> None:
        """Find the Trainer (its callbacks: this one first) and keep a full model's base."""
        trainer = self._trainer() if self._trainer is not None else _find_trainer(self)
        if trainer is not None:
            self._trainer = weakref.ref(trainer)
            callbacks = trainer.callback_handler.callbacks
            callbacks.insert(0, callbacks.pop(next(i for i, c in enumerate(callbacks) if c is self)))
        self.monitor.begin(model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None,
                    **kwargs: Any) -> Any:
        """At a log point: measure, log, and stop training on a ``fail_on`` violation."""
        if not self.monitor.due(state.global_step):
            return control
        logs, stop = self.monitor.step(model, state.global_step)
        if logs:
            trainer = self._trainer() if self._trainer is not None else None
            if trainer is not None:
                trainer.log(dict(logs))
            else:  # no Trainer found: at least the history (trainer_state.json) gets them
                state.log_history.append({**logs, "step": state.global_step})
        if stop is not None:
            self.stop_reason = stop
            control.should_training_stop = True
        return control


__all__ = ["DEFAULT_EVERY", "SpectralCallback"]
