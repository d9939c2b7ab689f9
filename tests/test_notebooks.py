"""Execute every notebook top to bottom with its tiny default parameters (what CI runs).

Slow (each loads the embedded model and runs real forwards): marked ``slow``. Run one with
``pytest tests/test_notebooks.py -k 01``. Committed notebooks carry no outputs; this test
checks that too, so a notebook saved with outputs fails fast.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


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
    notebook = nbformat.read(path, as_version=4)
    env_before = dict(os.environ)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    # The kernel runs in tmp_path: name the repository, so that it imports the code under test (abft_lens and
    # the repository's analysis/), not whatever copy the environment has installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env_before.get("PYTHONPATH", "")) if p)
    try:
        client = nbclient.NotebookClient(notebook, timeout=1800, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path)}})
        started = time.perf_counter()
        client.execute()  # raises CellExecutionError naming the failing cell
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    print(f"{path.name}: executed in {time.perf_counter() - started:.0f} s")
