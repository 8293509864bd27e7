"""The example notebook runs, top to bottom, on a real Jupyter kernel (nbclient).

It documents the Python API (docs/api.md); running it here keeps it from
rotting. The kernel gets the digits models this test run trained.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "clever_digits.ipynb")


def test_example_notebook_runs(trained_digits, monkeypatch):
    monkeypatch.setenv("CLEVER_MODELS_DIR", trained_digits.dir)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        "the notebook is stored without outputs (they depend on the machine)"
    NotebookClient(nb, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("data", {}).get("text/plain", "") for o in outputs)
    # The scores table (2 images x top2/least where classified) and the comparison of the models.
    assert "CLEVER L2" in text and "top2" in text and "least" in text
    assert "7-layer CNN" in text and "2-layer" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the fit and the comparison
