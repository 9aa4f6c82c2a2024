"""Live spectral monitoring during training: ``SpectralCallback`` for the transformers ``Trainer``
and ``SpectralLightningCallback`` for Lightning (when it is installed).

Importing this package imports neither framework: each class is imported on first use::

    from deltaspec.callbacks import SpectralCallback
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                      callbacks=[SpectralCallback(every=200, fail_on={"top1_share": "<= 0.9"})])
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaspec.lazy import exports

if TYPE_CHECKING:
    from deltaspec.callbacks.hf import SpectralCallback
    from deltaspec.callbacks.lightning import SpectralLightningCallback
    from deltaspec.callbacks.monitor import Monitor

_LAZY = {"SpectralCallback": "deltaspec.callbacks.hf",
         "SpectralLightningCallback": "deltaspec.callbacks.lightning",
         "Monitor": "deltaspec.callbacks.monitor"}

__getattr__ = exports(__name__, _LAZY)


__all__ = ["Monitor", "SpectralCallback", "SpectralLightningCallback"]
