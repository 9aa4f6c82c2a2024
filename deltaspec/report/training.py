"""The democracy report's training figure: the ``trajectory.csv`` logs that ``deltaspec train``
writes beside each run (:data:`deltaspec.trajectory.LOG`), drawn when the compared runs carry one.
Kept apart from :mod:`deltaspec.report.trajectory` (the trajectory page, which uses the report's
writer) so that the writer can ask for it without an import circle."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd


def training_logs(runs: Mapping[str, Sequence[str | Path]]) -> pd.DataFrame | None:
    """The ``trajectory.csv`` logs (``deltaspec train``) of labelled run folders, with a
    ``label`` column; None when no run carries one."""
    from deltaspec.trajectory import LOG

    found = [pd.read_csv(Path(p) / LOG).assign(label=label)
             for label, paths in runs.items() for p in paths if (Path(p) / LOG).is_file()]
    if not found:
        return None
    df = pd.concat(found, ignore_index=True)
    df["label"] = pd.Categorical(df["label"], categories=list(dict.fromkeys(df["label"])))
    return df


def training_specs(runs: Mapping[str, Sequence[str | Path]]) -> list[tuple[str, str, str, Any]]:
    """The democracy report's figure "Normalised entropy over training" (one line per method,
    one panel per module kind), when the runs carry their training log: (stem, title, caption,
    plot) as :func:`deltaspec.report.write.render_figures` draws them."""
    logs = training_logs(runs)
    if logs is None:
        return []
    ks = sorted({int(k) for k in logs.get("top_k", pd.Series(dtype=float)).dropna()})
    over = f"the top K = {', '.join(map(str, ks))} singular values" if ks else "all singular values"
    caption = (f"Normalised entropy over {over} at the log points of each training run "
               "(deltaspec train --log-points), one panel per module kind: median across layers, "
               "band 10–90 %. Shows whether the methods' ordering is there from the start or "
               f"emerges late. Runs with a log: {', '.join(logs['label'].cat.categories)}.")

    def plot(data: Any, summary: Any, reference: Any) -> Any:
        from deltaspec.plots.trajectory import plot_trajectory

        return plot_trajectory(logs, "normalized_entropy",
                               title="Normalised entropy over training (line: median across "
                                     "layers, band: 10–90 %)")

    return [("entropy_over_training", "Normalised entropy over training", caption, plot)]


__all__ = ["training_logs", "training_specs"]
