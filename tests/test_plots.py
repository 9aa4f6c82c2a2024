"""deltaspec.plots: every figure of the democracy report is drawn from the report's tables, is
labelled (titles, axis labels, legend), has no overlapping text, and leaves pyplot alone."""

from __future__ import annotations

import itertools
import subprocess
import sys

import factories as F
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from deltaspec import plots as P  # noqa: E402
from deltaspec.errors import UsageError  # noqa: E402
from deltaspec.report import collect, summary_table  # noqa: E402

KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, llama, llama_lora, llama_full):
    model, base = llama
    ml = F.multilora_adapter(model, tmp_path_factory.mktemp("ml_plots"), n=2, r=3)
    return collect({"lora": llama_lora[0], "multilora": ml, "full": llama_full}, base)


def _drawn_texts(fig: Figure) -> list[Text]:
    """Visible texts, tick labels only for ticks inside the view (matplotlib skips the others)."""
    ticks, drawn = set(), []
    for a in fig.axes:
        for axis in (a.xaxis, a.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            eps = 1e-9 * max(abs(lo), abs(hi), 1)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks.update({id(tick.label1), id(tick.label2)})
                if lo - eps <= tick.get_loc() <= hi + eps:
                    drawn += [lb for lb in (tick.label1, tick.label2) if lb.get_visible()]
    drawn += [t for t in fig.findobj(Text) if id(t) not in ticks and t.get_visible()]
    return [t for t in drawn if t.get_text().strip()]


def _overlaps(fig: Figure) -> list[tuple[str, str]]:
    """Pairs of drawn texts whose boxes intersect (shrunk by 1 px: touching is fine)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    boxes = [(t.get_text(), t.get_window_extent(renderer).padded(-1)) for t in _drawn_texts(fig)]
    boxes = [(s, b) for s, b in boxes if b.width > 0]
    return [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]


def _outside(fig: Figure) -> list[str]:
    """Drawn texts that stick out of the figure (clipped in the saved PNG)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox.padded(1)
    out = []
    for t in _drawn_texts(fig):
        b = t.get_window_extent(renderer)
        if b.width > 0 and not (box.x0 <= b.x0 and b.x1 <= box.x1 and box.y0 <= b.y0 and b.y1 <= box.y1):
            out.append(t.get_text())
    return out


def _check_readable(fig: Figure, panels: int) -> None:
    axes = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert len(axes) == panels
    for a in axes:
        assert (a.get_title() or panels == 1) and a.get_xlabel()
    assert any(a.get_ylabel() for a in axes)
    assert fig.get_suptitle()
    assert _overlaps(fig) == []
    assert _outside(fig) == []


def test_spectra_and_energy(data):
    for plot in (P.plot_spectra, P.plot_energy):
        fig = plot(data)
        _check_readable(fig, len(KINDS))
        assert [a.get_title() for a in fig.axes] == KINDS
        assert [t.get_text() for t in fig.legends[0].get_texts()] == ["lora", "multilora", "full"]
    lines = P.plot_spectra(data).axes[0].get_lines()
    assert len(lines[0].get_xdata()) == 4  # the rank-4 LoRA's normalised spectrum ends at i = 4
    assert len(lines[2].get_xdata()) == 32  # the full fine-tune: every one of min(m, n) values
    lora_energy = P.plot_energy(data).axes[0].get_lines()[0].get_ydata()
    assert lora_energy[2] < 1 and np.allclose(lora_energy[3:], 1.0)  # all of it in 4 directions


def test_one_panel_figures_fit_their_titles(data):
    for plot in (P.plot_spectra, P.plot_energy, P.plot_entropy_by_layer, P.plot_similarity_by_layer):
        _check_readable(plot(data, kinds=["v_proj"]), 1)
    one = [g for g in data.grids if g.label_a == "lora" and g.label_b == "full"]
    _check_readable(P.plot_similarity_heatmap(one), 1)


def test_spectrum_line_is_the_median(data):
    fig = P.plot_spectra(data, kinds=["v_proj"])
    ys = fig.axes[0].get_lines()[1].get_ydata()  # multilora
    expect = data.spectra[(data.spectra.label == "multilora") & (data.spectra.kind == "v_proj")]
    np.testing.assert_array_equal(ys, expect["sigma_norm"].dropna().to_numpy())


def test_entropy_by_layer_and_summary(data):
    fig = P.plot_entropy_by_layer(data)
    _check_readable(fig, len(KINDS))
    assert "K = 4" in fig.get_suptitle()
    line = fig.axes[0].get_lines()[2]  # full, q_proj
    full_q = data.metrics[(data.metrics.label == "full") & (data.metrics.kind == "q_proj")]
    np.testing.assert_allclose(line.get_ydata(), full_q["normalized_entropy_topk"].to_numpy())
    _check_readable(P.plot_entropy_by_layer(data, metric="effective_rank"), len(KINDS))
    fig = P.plot_entropy_summary(data)
    _check_readable(fig, 1)
    heights = [p.get_height() for p in fig.axes[0].patches[:3]]
    means = summary_table(data.metrics)["normalized_entropy_topk"].to_numpy()
    np.testing.assert_allclose(heights, means)


def test_similarity(data):
    fig = P.plot_similarity_heatmap(data)
    _check_readable(fig, 3)
    assert [a.get_title() for a in fig.axes if a.get_label() != "<colorbar>"] == [
        "lora vs multilora", "lora vs full", "multilora vs full"]
    image = fig.axes[0].get_images()[0]
    np.testing.assert_array_equal(image.get_array(), data.grids[0].values)
    fig = P.plot_similarity_by_layer(data)
    _check_readable(fig, len(KINDS))
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {
        "lora vs multilora", "lora vs full", "multilora vs full"}


def test_reference_overlay_is_dashed(data):
    ref = data.spectra.copy()
    ref["sigma_norm"] = ref["sigma_norm"] ** 2
    fig = P.plot_spectra(data, reference=ref, kinds=["q_proj"])
    styles = {ln.get_label(): ln.get_linestyle() for ln in fig.axes[0].get_lines()}
    assert styles["lora (reference)"] == "--" and styles["lora"] == "-"
    fig = P.plot_entropy_by_layer(data, reference=data.metrics.assign(label="paper"), kinds=["q_proj"])
    styles = {ln.get_label(): ln.get_linestyle() for ln in fig.axes[0].get_lines()}
    assert styles == {"lora": "-", "multilora": "-", "full": "-", "paper (reference)": "--"}
    fig = P.plot_entropy_summary(data, reference=summary_table(data.metrics))
    assert "reference (top K)" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def test_draw_into_your_own_axes(data):
    fig = Figure()
    ax = fig.subplots()
    q = data.spectra[data.spectra.kind == "q_proj"]
    assert P.plot_spectra(q, ax=ax) is fig
    assert ax.get_legend() is not None and ax.get_title() == "q_proj"
    with pytest.raises(UsageError, match="7 panels"):
        P.plot_spectra(data, ax=ax)
    with pytest.raises(UsageError, match="not in the table"):
        P.plot_energy(data, kinds=["nope"])
    with pytest.raises(UsageError, match="not a column"):
        P.plot_entropy_by_layer(data, metric="nope")


def test_no_pyplot_state_and_lazy_import(data):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    P.plot_spectra(data)
    assert plt.get_fignums() == before  # nothing registered, nothing to close or show
    code = "import sys, deltaspec, deltaspec.plots, deltaspec.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_overlap_check_can_fail():
    fig = Figure()
    ax = fig.subplots()
    ax.set_title("a title")
    ax.text(0.5, 1.02, "stamped over the title", transform=ax.transAxes, ha="center")
    assert _overlaps(fig) != []
    fig = Figure(figsize=(3, 2))
    fig.suptitle("a title far too long for a figure only three inches wide, so it is clipped")
    assert _outside(fig) != []
