"""examples/quickstart.ipynb runs top to bottom: the notebook API (build, sample a batch, train k steps,
reconstruct, finish) as a researcher uses it."""

import json

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in notebook.cells
               if cell.cell_type == "code"]
    text = "\n".join(outputs)
    assert "(16, 64, 64, 3) uint8" in text
    assert "step 20: loss" in text
    summary_line = next(line for line in text.splitlines() if line.startswith("{'steps'"))
    assert "'steps': 20" in summary_line and "'compilations_during_training': 0" in summary_line
    figures = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
               if "image/png" in o.get("data", {})]
    assert len(figures) == 3  # the batch, the loss curve, the reconstructions
    loss_line = next(line for line in text.splitlines() if line.startswith("step 20: loss"))
    before, after = (float(x) for x in loss_line.split("loss ")[1].split(" → "))
    assert after < before
    json.dumps(notebook)  # outputs are plain JSON (nothing unserialisable leaked in)
