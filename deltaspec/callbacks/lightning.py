"""``SpectralLightningCallback``: the live monitor (:mod:`deltaspec.callbacks.monitor`) as a
Lightning ``Callback`` (``lightning`` or ``pytorch_lightning``, an optional extra).

Scalars go to ``trainer.logger.log_metrics`` at the trainer's global step (every logger
Lightning has: TensorBoard, W&B, CSV); a ``fail_on`` violation sets ``trainer.should_stop``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from deltaspec.callbacks.monitor import DEFAULT_EVERY, DEFAULT_METRICS, Monitor
from deltaspec.errors import UsageError


def _callback_base() -> Any:
    """Lightning's ``Callback`` (``lightning`` or ``pytorch_lightning``), or None when neither is
    installed (then the class says so when it is made, not at import)."""
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(module).Callback
        except ImportError:
            continue
    return None


_Base = _callback_base()


class SpectralLightningCallback(_Base or object):  # type: ignore[misc]
    """The Lightning twin of :class:`deltaspec.callbacks.hf.SpectralCallback` (same arguments)."""

    def __init__(self, every: int = DEFAULT_EVERY, metrics: Sequence[str] = DEFAULT_METRICS,
                 k: int = 8, fail_on: Any = None, base: Any = None, **options: Any) -> None:
        if _Base is None:
            raise UsageError("SpectralLightningCallback needs Lightning: pip install lightning")
        self.monitor = Monitor(every, metrics, k, fail_on, base, **options)
        self.stop_reason: str | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Keep a full model's base (the weights when training starts)."""
        self.monitor.begin(pl_module)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """At a log point: measure, log, and stop on a ``fail_on`` violation."""
        step = int(trainer.global_step)
        if not self.monitor.due(step):
            return
        logs, stop = self.monitor.step(pl_module, step)
        if logs and trainer.logger is not None:
            trainer.logger.log_metrics(logs, step=step)
        if stop is not None:
            self.stop_reason = stop
            trainer.should_stop = True


__all__ = ["SpectralLightningCallback"]
