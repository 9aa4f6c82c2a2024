"""The democracy report: several labelled updates of one base (e.g. LoRA, MultiLoRA, full FT) →
figures, CSV tables, ``summary.json`` with a written verdict, and a self-contained ``index.html``.

>>> from deltaspec.report import write_report                          # doctest: +SKIP
>>> write_report({"lora": "out/lora", "full": "out/full"}, "report", base="out/base")  # doctest: +SKIP

``collect`` builds the tables (:class:`ReportData`), ``save_report`` writes them, ``write_report``
does both. The figures themselves are :mod:`deltaspec.plots`.
"""

from deltaspec.report.data import ReportData, SimilarityGrid, collect, parse_updates
from deltaspec.report.verdict import expected_order, summary_table, verdict
from deltaspec.report.write import check_out_dir, render_figures, save_report, write_report

__all__ = [
    "ReportData",
    "SimilarityGrid",
    "check_out_dir",
    "collect",
    "expected_order",
    "parse_updates",
    "render_figures",
    "save_report",
    "summary_table",
    "verdict",
    "write_report",
]
