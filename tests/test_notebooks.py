"""Execute every notebook top to bottom with its tiny default parameters (what CI runs), and check the
pages that publish them executed (docs/notebooks/, `make notebooks-html`) without executing anything.

Slow (each loads the embedded model and runs real forwards): marked ``slow``. Run one with
``pytest tests/test_notebooks.py -k 01``. Committed notebooks carry no outputs; this test
checks that too, so a notebook saved with outputs fails fast. The published pages are checked as
committed: rendered from the notebook as it is now, nothing loaded from the network, and in headless
Chromium every figure drawn with its traces, no JavaScript error, a screenshot that is not blank.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import time
from pathlib import Path

import pytest

from browser import browser, png_colour_stats, probe, screenshot

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
PAGES = REPO / "docs" / "notebooks"


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


# --- the published pages ----------------------------------------------------------------------------

# Every plotly figure on the page: its traces, and the trace layers plotly drew for them; every URL the page
# (or a script in it) asks for, which must be a local file; whether the shared stylesheet applies (it hides
# the collapsers).
PAGE_JS = """
const plots = [...document.querySelectorAll('.js-plotly-plot')];
return {plots: plots.length, divs: document.querySelectorAll('.plotly-graph-div').length,
        traces: plots.map(p => p.data.length),
        drawn: plots.map(p => p.querySelectorAll('g.trace, g.hm').length),
        plotly: typeof Plotly === 'object',
        fetched: [...document.querySelectorAll('[src], link[href]')].map(e => e.src || e.href),
        styled: getComputedStyle(document.querySelector('.jp-Collapser')).display === 'none',
        cells: document.querySelectorAll('.jp-Cell').length};
"""


def _page(path: Path) -> Path:
    page = PAGES / f"{path.stem}.html"
    if not page.is_file():
        pytest.skip(f"{page.relative_to(REPO)} is missing: `make notebooks-html` renders it")
    return page


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_published_page_is_rendered_from_the_notebook_as_committed(path):
    render = render_notebooks()
    page = _page(path).read_text(encoding="utf-8")
    found = re.search(rf'<meta (?=[^>]*name="{render.NOTEBOOK_HASH_META}")[^>]*content="([0-9a-f]+)"', page)
    assert found, f"{path.stem}.html records no notebook hash: rerun `make notebooks-html`"
    assert found.group(1) == render.notebook_sha256(nbformat.read(path, as_version=4)), \
        f"{path.name} changed since its page was rendered: rerun `make notebooks-html`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_published_page_loads_only_the_shared_files_beside_it(path):
    render = render_notebooks()
    page = _page(path).read_text(encoding="utf-8")
    loaded = (re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", page)
              + re.findall(r"<link[^>]*\shref=\"([^\"]+)\"", page))
    assert sorted(loaded) == sorted([render.PLOTLY_FILE, render.CSS_FILE]), loaded
    assert all((PAGES / name).is_file() for name in loaded)
    assert "window.PlotlyConfig" not in page and len(page) < 1_000_000  # plotly.js is not inlined


@pytest.mark.skipif(browser() is None, reason="no chromium/chrome on PATH (apt-get install chromium): "
                                              "the browser tests need one")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_published_page_in_a_browser_draws_every_figure_offline(path, tmp_path):
    render = render_notebooks()
    page = _page(path)
    # The probe writes a copy beside the page: work on a copy of the folder, not in the checkout.
    for name in (page.name, render.PLOTLY_FILE, render.CSS_FILE):
        shutil.copy(PAGES / name, tmp_path / name)
    seen = probe(tmp_path / page.name, PAGE_JS)
    assert seen["errors"] == [] and "exception" not in seen, seen
    assert seen["plots"] == seen["divs"] >= 1, seen
    assert all(n >= 1 for n in seen["traces"]) and seen["drawn"] == seen["traces"], seen
    assert seen["plotly"] and seen["fetched"], seen
    assert all(url.startswith("file://") for url in seen["fetched"]), seen["fetched"]
    assert seen["styled"] and seen["cells"] == len(nbformat.read(path, as_version=4).cells)
    shot = screenshot(tmp_path / page.name, tmp_path / "page.png", 1200, 2400)
    width, height, colours, ink = png_colour_stats(shot)
    assert (width, height) == (1200, 2400) and colours > 20 and ink > 0.05
