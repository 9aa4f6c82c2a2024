"""Figures of the democracy report: each ``plot_*(data, *, ax=None, …) -> Figure``.

``data`` is the matching table of :class:`deltaspec.report.ReportData` (``spectra``, ``metrics``,
``similarity``, ``grids``), the ReportData itself, or a DataFrame ``deltaspec.analyze`` /
``deltaspec.compare`` returned (one update, or A and B; heatmaps need ``report.collect``'s
vectors); filter a table first to draw fewer kinds or layers. Figures are built without pyplot
(nothing is shown, saved or kept open by matplotlib), so in Jupyter a returned figure displays
once, inline. Pass ``ax`` (one Axes per panel) to draw into
your own figure. ``reference`` (same schema) is overlaid dashed, e.g. the shipped reference curves.
matplotlib is imported only when a plot is made.
"""

from deltaspec.plots.act import plot_truncation_error
from deltaspec.plots.curves import (
    plot_energy,
    plot_entropy_by_layer,
    plot_entropy_summary,
    plot_spectra,
)
from deltaspec.plots.similarity import plot_similarity_by_layer, plot_similarity_heatmap
from deltaspec.plots.trajectory import plot_drift, plot_trajectory, plot_trajectory_heatmap

__all__ = ["plot_drift", "plot_energy", "plot_entropy_by_layer", "plot_entropy_summary",
           "plot_similarity_by_layer", "plot_similarity_heatmap", "plot_spectra", "plot_trajectory",
           "plot_trajectory_heatmap", "plot_truncation_error"]
