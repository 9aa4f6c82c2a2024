"""Acting on the spectrum: compress an adapter, extract a LoRA from a full fine-tune, suggest ranks.

- :mod:`~deltaspec.act.truncate` — one module's exact rank-k truncation and its saved error;
- :mod:`~deltaspec.act.table` — ``compression.csv`` and the suggestion table (columns, totals);
- :mod:`~deltaspec.act.writer` — the PEFT LoRA folder, written atomically;
- :mod:`~deltaspec.act.run` — ``compress``/``extract``: load, the module loop, write;
- :mod:`~deltaspec.act.suggest` — the rank each policy gives, nothing written;
- :mod:`~deltaspec.act.verify` — ``verify-merge``: does a merged checkpoint hold the adapter.

Rank policies live with the metrics (:mod:`deltaspec.metrics.ranks`). The public names are
imported on first use (torch and pandas load only then).
"""

from __future__ import annotations

from deltaspec.lazy import exports

_LAZY = {"compress": "deltaspec.act.run", "extract": "deltaspec.act.run",
         "suggest_ranks": "deltaspec.act.suggest",
         "verify_merge": "deltaspec.act.verify"}

__getattr__ = exports(__name__, _LAZY)


__all__ = ["compress", "extract", "suggest_ranks", "verify_merge"]
