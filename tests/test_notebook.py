"""analyses/notebook.ipynb runs end to end in a fresh kernel (nbclient + ipykernel), with no error,
and its figures display inline."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "analyses" / "notebook.ipynb"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 5  # spectra, energy, entropy per layer, heatmap, own axes
    texts = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "lower is more democratic" in texts  # the verdict (deltaspec.report.verdict_text)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("normalized_entropy" in h for h in html)  # DataFrames render as tables
    assert list(tmp_path.iterdir()) == []  # the notebook cleans up after itself
