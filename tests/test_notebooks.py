"""Execute every notebook top to bottom with its tiny default parameters (what CI runs).

Slow (each loads the embedded model and runs real forwards): marked ``slow``. Run one with
``pytest tests/test_notebooks.py -k 01``. Committed notebooks carry no outputs; this test
checks that too, so a notebook saved with outputs fails fast.
"""

from __future__ import annotations

import functools
import importlib.util
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


@functools.cache
def render_notebooks():
    """scripts/render_notebooks.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_notebooks", REPO / "scripts" / "render_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _strip_outputs_missing(notebook) -> list[int]:
    return [index for index, cell in enumerate(notebook.cells)
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count"))]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_notebook_has_no_outputs_and_a_parameters_cell(path):
    notebook = nbformat.read(path, as_version=4)
    assert _strip_outputs_missing(notebook) == [], f"{path.name}: strip outputs before committing"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell tagged `parameters`"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_top_to_bottom(path, tmp_path):
    # The same execution as `make notebooks-html`: the kernel imports the repository's code, runs in tmp_path.
    started = time.perf_counter()
    render_notebooks().execute_notebook(path, tmp_path)  # raises CellExecutionError naming the failing cell
    print(f"{path.name}: executed in {time.perf_counter() - started:.0f} s")
