"""The figures draw what users have: the DataFrames analyze/compare return (no KeyError), and
deltaspec.plot_democracy draws the democracy figures for any labelled updates in one call."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

import deltaspec  # noqa: E402
from deltaspec import plots as P  # noqa: E402
from deltaspec.errors import UsageError  # noqa: E402


@pytest.fixture(scope="module")
def lora_df(llama_lora):
    return deltaspec.analyze(llama_lora[0])


def _lines(fig: Figure, title: str) -> dict[str, np.ndarray]:
    ax = next(a for a in fig.axes if a.get_title() == title)
    return {ln.get_label(): np.asarray(ln.get_ydata(), dtype=float) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def test_spectra_of_an_analyze_frame_are_its_normalised_singular_values(llama_lora, lora_df):
    fig = P.plot_spectra(lora_df)
    assert len(fig.axes) == 7
    sp = deltaspec.spectra(llama_lora[0])
    q = [m for m in sp if m.endswith("q_proj")]
    want = np.median([sp[m].values.numpy() / sp[m].values[0].item() for m in q], axis=0)[:4]
    got = _lines(fig, "q_proj")["update"]
    np.testing.assert_allclose(got[:4], want, rtol=1e-9)


def test_a_filtered_frame_plots_its_rows(lora_df):
    fig = P.plot_energy(lora_df[lora_df.kind.isin(["q_proj", "v_proj"])])
    assert sorted(a.get_title() for a in fig.axes) == ["q_proj", "v_proj"]
    fig = P.plot_entropy_by_layer(lora_df.sort_values("layer"), metric="normalized_entropy")
    line = _lines(fig, "q_proj")["update"]
    np.testing.assert_allclose(line, lora_df[lora_df.kind == "q_proj"]["normalized_entropy"]
                               .to_numpy(dtype=float), rtol=0)


def test_summary_bars_of_an_analyze_frame(lora_df):
    fig = P.plot_entropy_summary(lora_df)
    heights = sorted(round(p.get_height(), 12) for p in fig.axes[0].patches if p.get_height() > 0)
    assert round(float(lora_df["normalized_entropy"].mean()), 12) in heights


def test_compare_frame_draws_both_sides_and_the_similarity(llama, llama_lora, llama_full):
    _, base = llama
    cmp = deltaspec.compare(llama_lora[0], llama_full, base=base, k=4)
    assert set(_lines(P.plot_spectra(cmp), "q_proj")) == {"A", "B"}
    sim = _lines(P.plot_similarity_by_layer(cmp), "v_proj")["A vs B"]
    np.testing.assert_allclose(sim, cmp[cmp.kind == "v_proj"]["subspace_sim_left"].to_numpy(float))
    with pytest.raises(UsageError, match="singular vectors"):
        P.plot_similarity_heatmap(cmp)


def test_frames_without_their_values_say_what_to_do(lora_df):
    other = lora_df.copy()
    other.attrs = {}
    with pytest.raises(UsageError, match="plot_democracy"):
        P.plot_spectra(pd.concat([lora_df, other]))
    assert len(P.plot_entropy_by_layer(other).axes) == 7  # per-row metrics need no values


def test_plot_democracy_draws_every_figure(llama, llama_lora, llama_full):
    _, base = llama
    figs = deltaspec.plot_democracy({"lora": llama_lora[0], "full": llama_full}, base=base,
                                    include="layers.0.self_attn")
    assert list(figs) == ["spectra", "energy", "entropy_by_layer", "entropy_summary",
                          "similarity_by_layer", "similarity_heatmap"]
    assert all(isinstance(f, Figure) for f in figs.values())
    assert list(figs.data.labels) == ["lora", "full"]
