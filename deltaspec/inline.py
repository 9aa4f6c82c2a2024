"""The democracy figures inline, in one call: :func:`plot_democracy` (``deltaspec.plot_democracy``).

>>> figs = deltaspec.plot_democracy({"lora": lora_dir, "full": ft}, base=base)  # doctest: +SKIP
>>> figs                 # in Jupyter: every figure, inline                    # doctest: +SKIP
>>> figs.data.metrics    # the tables they are drawn from                      # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from deltaspec import plots


class Figures(dict):
    """Figure name → matplotlib Figure; Jupyter draws every one of them inline, in order."""

    def _ipython_display_(self) -> None:
        from IPython.display import display

        for fig in self.values():
            display(fig)

    def __repr__(self) -> str:
        return f"Figures({', '.join(self)})"


def plot_democracy(updates: Any, base: Any = None, **options: Any) -> Figures:
    """The democracy report's figures for labelled updates, inline: ``updates`` maps a label to
    a folder, a Hub id or a live object (PeftModel, nn.Module, state dict); ``options`` are
    :func:`deltaspec.report.collect`'s (``k``, ``top_k``, ``module``, ``include``, …).

    Returns :class:`Figures` (spectra, energy, entropy_by_layer, entropy_summary, and with two or
    more updates similarity_by_layer and similarity_heatmap); ``.data`` holds the tables.
    """
    from deltaspec.report.data import collect

    data = collect(updates, base, **options)
    figs = Figures(spectra=plots.plot_spectra(data), energy=plots.plot_energy(data),
                   entropy_by_layer=plots.plot_entropy_by_layer(data),
                   entropy_summary=plots.plot_entropy_summary(data))
    if len(data.labels) > 1:
        figs["similarity_by_layer"] = plots.plot_similarity_by_layer(data)
        figs["similarity_heatmap"] = plots.plot_similarity_heatmap(data)
    figs.data = data  # type: ignore[attr-defined]
    return figs


__all__ = ["Figures", "plot_democracy"]
