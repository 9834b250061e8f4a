"""notebooks/quickstart.ipynb runs top to bottom, as a user would run it (JAX's own device setup)."""

import os

import pytest
from conftest import ROOT

nbformat = pytest.importorskip("nbformat", reason="the notebook test needs the [test] extras")
nbclient = pytest.importorskip("nbclient", reason="the notebook test needs the [test] extras")


def test_quickstart_notebook_executes(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel starts with a user's device setup
  path = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
  notebook = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()  # raises CellExecutionError, with the cell and traceback, if any cell fails
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert any("image/png" in o.get("data", {}) for o in outputs), "the loss plot is drawn"
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  assert "Once upon a time" in text and "val_loss" in "".join(
      str(o.get("data", {}).get("text/plain", "")) for o in outputs)
