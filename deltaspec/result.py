"""The one shape of a result: :class:`Analysis`, what both executors of a plan return — a
pandas-free table (``rows``: :class:`~deltaspec.output.Rows`, columns of :mod:`deltaspec.columns`), the
singular values and (when asked) the spectra. The public ``analyze``/``compare`` build the
DataFrame at the boundary (:meth:`Analysis.frame`). Imports neither torch nor pandas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deltaspec.output import Rows

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class Analysis:
    """What an executor returns.

    ``rows``: the table, one row per module (:mod:`deltaspec.columns`), pandas-free (``table``:
    the same as a DataFrame); ``spectra``: module (A's name) → its
    :class:`~deltaspec.engine.spectrum.Spectrum`, or (A's, B's) in a comparison — filled with
    ``keep_spectra``; ``skipped``: (tensor, reason) the loaders passed over; ``only_a``/``only_b``:
    modules of one side only (a comparison); ``with_base``: whether base-relative metrics were
    computed; ``sigmas``: module → σ (or (σ_A, σ_B)) as float64 numpy arrays; ``notes``: the
    loaders' remarks (e.g. an unsaved α); ``executor``: which executor made it, and why; ``k``:
    the K of the pairwise columns. Figures draw it directly (:mod:`deltaspec.plots`).
    """

    rows: Rows
    spectra: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    with_base: bool = False
    sigmas: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    executor: str = ""
    k: int = 8  # the subspace dimension K of the pairwise columns

    def frame(self) -> pd.DataFrame:
        """The table as a DataFrame (typed columns of :func:`deltaspec.columns.frame`)."""
        from deltaspec import columns as cols

        return cols.frame(self.rows.rows, self.rows.columns)

    @property
    def table(self) -> pd.DataFrame:
        """The table as a DataFrame (:meth:`frame`; what ``.table`` was before the rows)."""
        return self.frame()


__all__ = ["Analysis"]
