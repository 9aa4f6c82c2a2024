"""The democracy report: `deltaspec report` on three genuine updates of one tiny Llama (PEFT LoRA,
MultiLoRA, full fine-tune), its numbers against float64 numpy, the verdict, the page in headless
Chromium, and bad input (one-line errors, nothing half-written)."""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import textwrap
from pathlib import Path

import factories as F
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from deltaspec.cli import main
from deltaspec.errors import DeltaspecError, UsageError
from deltaspec.report import collect, save_report, summary_table, verdict, write_report
from deltaspec.report.verdict import ONE_RUN, expected_order, in_order

FIGURES = ("entropy_summary", "spectra", "energy", "entropy_by_layer", "effective_rank_by_layer",
           "similarity_heatmap", "similarity_by_layer")


@pytest.fixture(scope="module")
def updates(tmp_path_factory, llama, llama_lora, llama_full):
    """label → folder of three updates of the tiny Llama, and its base folder."""
    model, base = llama
    ml = F.multilora_adapter(model, tmp_path_factory.mktemp("llama_multilora"), n=3, r=2)
    return {"lora": str(llama_lora[0]), "multilora": str(ml), "full": str(llama_full)}, str(base)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, updates):
    ups, base = updates
    out = tmp_path_factory.mktemp("rep") / "report"
    args = ["report", *(f"{k}={v}" for k, v in ups.items()), "--base", base, "--out", str(out), "-q"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "No method verdict: one run per method" in res.output  # one run each: no verdict
    return out


@pytest.fixture(scope="module")
def data(updates):
    ups, base = updates
    return collect(ups, base)


def test_report_folder_has_every_file(report_dir):
    names = {p.name for p in report_dir.iterdir()}
    assert {"index.html", "summary.json", "summary.csv", "metrics.csv", "spectra.csv",
            "similarity.csv"} <= names
    assert {f"{f}.png" for f in FIGURES} <= names
    doc = json.loads((report_dir / "summary.json").read_text())
    assert doc["generator"] == "deltaspec report"
    assert doc["methods"] == {"lora": "lora", "multilora": "multilora", "full": "full"}
    assert doc["modules"] == {"lora": 14, "multilora": 14, "full": 14}
    assert set(doc["not_compared"]) == {"full"}  # embeddings and lm_head: only the full FT has them
    assert doc["top_k"] == 4  # the LoRA's rank, the smallest compared
    nulls = pd.read_csv(report_dir / "nulls.csv")
    assert set(nulls.groupby("label")["null"].unique().map(frozenset)) == {
        frozenset({"random"}), frozenset({"random", "equalised"}),
        frozenset({"random", "projected"})}
    assert sorted(doc["figures"]) == sorted(f"{f}.png" for f in FIGURES)
    page = (report_dir / "index.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert not list(report_dir.parent.glob(".report.*"))  # no temporary folder left


def test_cli_prints_the_summary_in_every_format(report_dir, capsys):
    from deltaspec.cli.report import print_summary

    index = report_dir / "index.html"
    print_summary(index, "json", quiet=True)
    assert json.loads(capsys.readouterr().out)["verdict"]["expected_order"] == ["lora", "multilora", "full"]
    print_summary(index, "csv", quiet=True)
    assert capsys.readouterr().out.splitlines()[0].startswith("label,method,modules,")
    print_summary(index, "table", quiet=False)
    out, err = capsys.readouterr()
    assert "Mean top-1 energy share within the top r" in " ".join(out.split()) and f"wrote {index}" in err


def test_verdict_matches_the_tables(report_dir):
    doc = json.loads((report_dir / "summary.json").read_text())
    metrics = pd.read_csv(report_dir / "metrics.csv")
    v = doc["verdict"]
    means = metrics.groupby("label")["share1_of_r"].mean()
    for label, value in v["values"].items():
        assert value == pytest.approx(means[label], rel=1e-12)
    assert v["expected_order"] == ["lora", "multilora", "full"]
    assert v["status"] == ONE_RUN and v["holds"] is None  # one run per method: no method verdict
    assert v["point_order"] == in_order([means["lora"], means["multilora"], means["full"]])
    assert all(p["verdict"] is None and p["unit"] == "modules" for p in v["pairs"])
    assert "says nothing about seed-to-seed variation" in v["text"] and "HOLDS" not in v["text"]
    assert f"r = {doc['top_k']}" in v["text"] and "Descriptive only" in v["text"]
    page = (report_dir / "index.html").read_text()
    assert "no method verdict (one run per method)" in page


def _svd(delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, s, _ = np.linalg.svd(delta)
    return s, u


def _norm_entropy(s: np.ndarray) -> float:
    p = s / s.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(len(s)))


def _multilora_dense(folder, module: str) -> np.ndarray:
    t = load_file(f"{folder}/multilora_model.safetensors")
    cfg = json.loads((folder / "multilora_config.json").read_text())
    a, b = t[f"{module}.lora_A"].double().numpy(), t[f"{module}.lora_B"].double().numpy()
    s = t[f"{module}.lora_scaling"].double().numpy()
    return sum(s[i] * b[i] @ a[i] for i in range(len(s))) * cfg["lora_alpha"] / cfg["r"]


def test_numbers_against_numpy(data, llama, llama_lora, updates):
    """Top-K entropy, the normalised-spectrum median and φ(K, K) from float64 numpy SVDs of the
    oracle deltas (PEFT's merge for the LoRA, ΣsᵢBᵢAᵢα/r for the MultiLoRA)."""
    model, _ = llama
    oracle = F.expected_deltas(model, llama_lora[1])
    ml_folder = Path(updates[0]["multilora"])
    k = data.top_k
    m = data.metrics.set_index(["label", "module"])
    svals = {}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"):
        s_l, u_l = _svd(oracle[name].numpy())
        s_m, u_m = _svd(_multilora_dense(ml_folder, name))
        assert m.loc[("lora", name), "normalized_entropy_topk"] == pytest.approx(
            _norm_entropy(s_l[:k]), abs=1e-9)
        assert m.loc[("multilora", name), "normalized_entropy_topk"] == pytest.approx(
            _norm_entropy(s_m[:k]), abs=1e-9)
        svals[name] = s_m
        sim = data.similarity.set_index(["pair", "module"]).loc[("lora vs multilora", name)]
        kk = min(data.k, 4, 6)
        phi = np.square(u_l[:, :kk].T @ u_m[:, :kk]).sum() / kk
        assert sim["phi_left"] == pytest.approx(phi, abs=1e-6)  # float32 factors on disk
    # the plotted curve: median across the two layers of σᵢ/σ₁ (numpy's median of two = the mean)
    curve = data.spectra[(data.spectra.label == "multilora") & (data.spectra.kind == "q_proj")]
    expect = np.median([s[:6] / s[0] for s in svals.values()], axis=0)
    np.testing.assert_allclose(curve["sigma_norm"].to_numpy()[:6], expect, rtol=1e-6)
    assert curve["sigma_norm"].iloc[6:].isna().all()  # beyond the rank n·r = 6: nothing drawn


def test_dataframes_are_tidy(data):
    df = data.metrics
    assert list(df.columns[:7]) == ["label", "module", "layer", "kind", "method", "shape", "rank_bound"]
    assert list(df["label"].cat.categories) == ["lora", "multilora", "full"]
    assert list(df["kind"].cat.categories) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj", "down_proj"]
    assert str(df["layer"].dtype) == "Int64"
    q0 = df[(df.layer == 0) & (df.kind == "q_proj")]  # filter by layer and kind
    assert list(q0["label"]) == ["lora", "multilora", "full"]


def _summary(values: dict[str, float]) -> pd.DataFrame:
    rows = [{"label": k, "method": k, "modules": 3, "runs": 1, "share1_of_r": v,
             "normalized_entropy": v / 2} for k, v in values.items()]
    return pd.DataFrame(rows)


def test_verdict_without_module_data_gives_no_verdict():
    v = verdict(_summary({"LoRA-r8": 0.5, "MultiLoRA-n4": 0.6, "Full": 0.3}), top_k=8)
    assert v["expected_order"] == ["LoRA-r8", "MultiLoRA-n4", "Full"]
    assert v["holds"] is None and v["status"] is None and v["point_order"] is False
    assert "no verdict" in v["text"] and "HOLDS" not in v["text"]


def test_verdict_order_sources():
    assert expected_order(["a", "b", "c"], {"a": "full", "b": "lora", "c": "multilora"}) == (
        ["b", "c", "a"], "matched by checkpoint methods")
    assert expected_order(["x", "y"], {}, ["y", "x"])[0] == ["y", "x"]
    with pytest.raises(UsageError, match="unknown label"):
        expected_order(["x", "y"], {}, ["x", "z"])
    v = verdict(_summary({"lora_a": 0.5, "lora_b": 0.6}), top_k=4)  # two LoRAs: no role order
    assert v["holds"] is None and "No expected ordering" in v["text"] and "lora_a 0.500" in v["text"]
    v = verdict(_summary({"lora": 0.5, "full": 0.3}), top_k=4)  # only two roles: lora → full
    assert v["expected_order"] == ["lora", "full"] and v["point_order"] is True
    assert in_order([0.3, 0.2, 0.2]) and not in_order([0.2, 0.2, 0.1])
    assert not in_order([0.3, 0.1, 0.2])


def _tiny_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def fast_figures(monkeypatch):
    """Skip drawing (tested by the report fixture and test_plots) where a test is about files."""
    import deltaspec.report.write as W
    from deltaspec.report.html import FigureFile

    def fake(data, summary, reference=None, svg=False):
        return [FigureFile(name, title, caption, _tiny_png(), b"<svg/>" if svg else None)
                for name, title, caption, _ in W._figure_specs(data)]

    monkeypatch.setattr(W, "render_figures", fake)


def test_extra_tables_and_reference(tmp_path, data, monkeypatch):
    import deltaspec.report.write as W

    specs = W._figure_specs
    monkeypatch.setattr(W, "_figure_specs", lambda d: specs(d)[:2])  # summary and spectra: drawn
    extra = {"training": pd.DataFrame({"method": ["lora", "full"], "tokens_per_s": [400.0, 208.0]})}
    ref = {"spectra": data.spectra.assign(sigma_norm=data.spectra.sigma_norm * 0.5),
           "summary": summary_table(data.metrics)}
    index = save_report(data, tmp_path / "r", extra_tables=extra, reference=ref, svg=True)
    assert (tmp_path / "r" / "training.csv").read_text().startswith("method,tokens_per_s")
    assert (tmp_path / "r" / "spectra.svg").stat().st_size > 0
    page = index.read_text()
    assert "tokens_per_s" in page and "Training: held-out accuracy" in page
    assert "208 tokens/s" in page  # formatted for people on the page; raw in the CSV
    assert "id='show-ref'" in page and page.count("class='no-ref'") == 2  # overlay can be hidden
    doc = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert doc["extra_tables"]["training"][1] == {"method": "full", "tokens_per_s": 208.0}
    with pytest.raises(UsageError, match="extra table"):
        save_report(data, tmp_path / "r2", extra_tables={"metrics": extra["training"]})
    assert not (tmp_path / "r2").exists()


def _run(args):
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


def _one_line_error(code, out, *words):
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("deltaspec: error:"), out
    assert "Traceback" not in out
    for w in words:
        assert w in lines[0], out


def test_bad_input_one_line_and_nothing_written(tmp_path, updates, llama_lora):
    ups, base = updates
    out = tmp_path / "rep"
    code, msg = _run(["report", f"lora={ups['lora']}", f"lora={ups['full']}", "--base", base,
                      "--out", str(out)])
    _one_line_error(code, msg, "'lora' given twice")
    code, msg = _run(["report", f"lora={ups['lora']}", "--out", ""])
    _one_line_error(code, msg, "output folder path is empty")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, msg = _run(["report", f"lora={ups['lora']}", "--out", str(blocker / "sub" / "rep")])
    _one_line_error(code, msg, "cannot create the output folder")
    code, msg = _run(["report", f"lora={ups['lora']}", "full=x", "--out", str(out), "--order", "lora,y"])
    _one_line_error(code, msg, "--order", "y")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_updates_of_different_bases(tmp_path, updates):
    ups, base = updates
    wide = F.lora_adapter(_widened(), tmp_path / "other_lora", r=2, lora_alpha=4,
                          target_modules=["q_proj", "v_proj"])[0]
    out = tmp_path / "rep"
    code, msg = _run(["report", f"lora={ups['lora']}", f"other={wide}", "--out", str(out)])
    _one_line_error(code, msg, "different bases", "q_proj")
    code, msg = _run(["report", f"lora={ups['lora']}", f"other={wide}", "--base", base, "--out", str(out)])
    _one_line_error(code, msg, "does not fit")
    assert not out.exists()


def _widened():
    """A tiny Llama of another width: adapters of it do not fit the fixtures' base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_existing_folders(tmp_path, data, fast_figures):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="not empty"):
        save_report(data, keep)
    assert (keep / "notes.txt").read_text() == "precious"
    target = tmp_path / "rep"
    save_report(data, target)
    (target / "stale.png").write_bytes(b"old")
    save_report(data, target)  # an earlier report is replaced as a whole
    assert not (target / "stale.png").exists() and (target / "index.html").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "rep"]


def test_failure_midway_leaves_nothing(tmp_path, data, monkeypatch, fast_figures):
    import deltaspec.report.write as W

    def broken(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(DeltaspecError, match="No space left"):
        W.save_report(data, tmp_path / "deep" / "rep")
    assert list(tmp_path.iterdir()) == []


def test_single_update_without_base(tmp_path, llama_lora, fast_figures):
    index = write_report({"mine": llama_lora[0]}, tmp_path / "one")
    doc = json.loads((index.parent / "summary.json").read_text())
    assert len(doc["figures"]) == 5 and doc["verdict"]["holds"] is None
    assert "No expected ordering" in doc["verdict"]["text"]


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECK_SCRIPT = textwrap.dedent("""
    <pre id="imgcheck">pending</pre>
    <script>window.addEventListener('load', () => {
      document.getElementById('imgcheck').textContent = Array.from(document.images)
        .map(i => i.complete + ':' + i.naturalWidth + 'x' + i.naturalHeight).join(' ');
    });</script>
""")


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_page_in_headless_chromium(report_dir, tmp_path):
    """Open the page as a user would (file://, no server): every figure decodes, and the
    screenshot is not blank."""
    chrome = _chromium()
    if chrome is None:
        pytest.skip("no chromium binary (.ci/run installs Debian's chromium)")
    from PIL import Image

    page = (report_dir / "index.html").read_text()
    check = report_dir / "_imgcheck.html"  # beside index.html, so relative links resolve the same
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    flags = [chrome, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    try:
        dom = subprocess.run([*flags, "--dump-dom", "--virtual-time-budget=5000", check.as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        shot = tmp_path / "shot.png"
        subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1400,3000",
                        (report_dir / "index.html").as_uri()], capture_output=True, timeout=120)
    finally:
        check.unlink()
    status = dom.split('<pre id="imgcheck">')[1].split("</pre>")[0].split()
    assert len(status) == len(FIGURES), dom[-2000:]
    for s in status:
        complete, size = s.split(":")
        w, h = map(int, size.split("x"))
        assert complete == "true" and w > 300 and h > 200, status
    img = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    hist = img.histogram()
    assert img.size[0] >= 1000 and max(hist) < 0.97 * sum(hist)  # not one flat colour
    dark = sum(hist[:128]) / sum(hist)
    assert dark > 0.002, dark  # text and plot lines were drawn


FIRST_SCREEN_PROBE = textwrap.dedent("""
    <pre id="probe">pending</pre>
    <script>window.addEventListener('load', () => {
      const b = id => Math.round(document.getElementById(id).getBoundingClientRect().bottom);
      document.getElementById('probe').textContent = [b('verdict'), b('tbl-0'),
        document.documentElement.scrollWidth].join(' ');
    });</script>
""")


@pytest.mark.slow
def test_first_screen_shows_verdict_and_training_table(tmp_path, data, fast_figures):
    """At 1400 × 900 px the verdict (with its interval) and the training table are on the first
    screen, nothing is wider than the window, and the numbers are formatted for people."""
    chrome = _chromium()
    if chrome is None:
        pytest.skip("no chromium binary (.ci/run installs Debian's chromium)")
    training = pd.DataFrame({"method": ["lora", "multilora", "full"],
                             "trainable_params": [157696, 157808, 824448],
                             "heldout_accuracy": [0.475, 0.556, 0.85],
                             "tokens_per_s": [11000.0, 10800.0, 11400.0],
                             "peak_memory_mb": [74.6, 74.9, 88.1]})
    index = save_report(data, tmp_path / "r", extra_tables={"training": training})
    page = index.read_text()
    assert "157.7 k" in page and "11.0 k tokens/s" in page and "74.6 MiB" in page
    assert "interval" in page and "Contents:" in page
    probe = index.parent / "_probe.html"
    probe.write_text(page.replace("</body>", FIRST_SCREEN_PROBE + "</body>"))
    flags = [chrome, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
             "--window-size=1400,900"]
    dom = subprocess.run([*flags, "--dump-dom", "--virtual-time-budget=5000", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    verdict_bottom, training_bottom, width = map(
        int, dom.split('<pre id="probe">')[1].split("</pre>")[0].split())
    assert verdict_bottom < training_bottom <= 900, (verdict_bottom, training_bottom)
    assert width <= 1400, width

