"""The notebooks run top to bottom in a fresh kernel, and are committed without outputs."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

FOLDER = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("export_figures", FOLDER / "export_figures.py")
export_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_figures)

EXPECTED = {"quickstart.ipynb", "affinity_analysis.ipynb", "routing_sharing.ipynb"}


def test_the_notebooks_are_there():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_no_outputs(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name} cell {i} has outputs: strip them"
            assert cell["execution_count"] is None, f"{path.name} cell {i} has a count"
    nbformat.validate(nbformat.reads(path.read_text(), as_version=4))


def test_kernel_runs_this_interpreter():
    """nbclient's "python3" kernel must be this virtualenv's Python (jupyter_client swaps the
    kernelspec's bare "python" for sys.executable)."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import sys, os; print(sys.executable); print(os.environ.get('JAX_PLATFORMS'))")])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120).execute()
    executable, platforms = nb.cells[0].outputs[0]["text"].split()
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert platforms == os.environ["JAX_PLATFORMS"]  # the kernel inherits the environment


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path):
    nb = export_figures.execute(path, timeout=600)  # raises CellExecutionError on any failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o["output_type"] == "error"]
    assert not errors
    for name, png in export_figures.tagged_figures(nb).items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
