"""Publish the notebooks executed: ``make notebooks-html`` runs notebooks/*.ipynb top to bottom with their
committed (CI-sized) parameters and writes docs/notebooks/NAME.html, pages that open offline from the file.

Offline means no CDN: the figures come out of the kernel as plotly's JSON (renderer ``plotly_mimetype``)
and are written into the page as plotly divs that load plotly.js from ``plotly.min.js`` beside the pages
(one copy for all of them, as abft_lens.report does for a run folder); the page template drops the
require.js, MathJax and mermaid loaders of nbconvert's lab template (they come from cdnjs, and the
notebooks need none of them); the lab CSS, the same on every page, is written once to ``notebook.css``.
Each page records the hash of the notebook it was rendered from (``NOTEBOOK_HASH_META``), so a test can
tell a page that is older than its notebook.

    .venv/bin/python scripts/render_notebooks.py [NAME ...] [--out docs/notebooks] [--no-execute]

The executed notebooks are kept in runs/notebooks/ (ignored by git): ``--no-execute`` renders the pages
again from them, without a kernel, e.g. after changing this script.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
OUT = REPO / "docs" / "notebooks"
EXECUTED = REPO / "runs" / "notebooks"
PLOTLY_FILE = "plotly.min.js"
CSS_FILE = "notebook.css"
PLOTLY_MIME = "application/vnd.plotly.v1+json"
NOTEBOOK_HASH_META = "abft-lens-notebook-sha256"

# nbconvert's lab page without anything it would fetch from a CDN, plotly.js from beside the page.
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}
<meta name="NOTEBOOK_HASH_META" content="{{ resources.notebook_sha256 }}">
<script src="PLOTLY_FILE"></script>
{%- endblock html_head_js -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
""".replace("NOTEBOOK_HASH_META", NOTEBOOK_HASH_META).replace("PLOTLY_FILE", PLOTLY_FILE)
_HEAD_STYLE = re.compile(r"\s*<style type=\"text/css\">(.*?)</style>", re.DOTALL)
# The executing kernel has no ipywidgets, so tqdm.auto warns once on stderr, naming this machine's
# site-packages; a reader's Jupyter shows progress widgets instead. Not the notebook's output: left off
# the page.
_KERNEL_NOISE = re.compile(r"TqdmWarning: IProgress not found")


def notebook_sha256(notebook) -> str:
    """Of the cells' types and sources only: saving a notebook again (metadata, ids) does not change it."""
    cells = [(cell.cell_type, cell.source) for cell in notebook.cells]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def execute_notebook(path: Path, workdir: Path, timeout: int = 1800):
    """``path`` executed top to bottom with its own parameters, the kernel's working directory ``workdir``
    (the notebooks write run folders there); raises nbclient's CellExecutionError naming the failing cell."""
    import nbclient

    notebook = nbformat.read(path, as_version=4)
    # The kernel imports the repository's code (abft_lens and analysis/), not an installed copy, and hands
    # figures back as plotly JSON whatever environment the command runs in (VS Code or Colab pick others).
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
           "PLOTLY_RENDERER": "plotly_mimetype",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)
    return notebook


def plotly_outputs_to_html(notebook) -> int:
    """Replace each plotly JSON output by a plotly div that draws it with the page's plotly.js (nbconvert
    shows no plotly JSON); returns the number of figures. Divs are numbered, so a re-render diffs cleanly."""
    import plotly.io as pio

    n_figures = 0
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            figure = output.get("data", {}).get(PLOTLY_MIME)
            if figure is None:
                continue
            n_figures += 1
            html = pio.to_html({"data": figure.get("data", []), "layout": figure.get("layout", {})},
                               config=figure.get("config"), include_plotlyjs=False, full_html=False,
                               div_id=f"figure-{n_figures}", validate=False)
            output["data"] = {"text/html": html}
    return n_figures


def drop_kernel_noise(notebook) -> None:
    """Remove the stderr outputs that the executing kernel wrote, not the notebook (_KERNEL_NOISE)."""
    def noise(output) -> bool:
        return (output.output_type == "stream" and output.name == "stderr"
                and bool(_KERNEL_NOISE.search(output.text)))

    for cell in notebook.cells:
        if "outputs" in cell:
            cell.outputs = [output for output in cell.outputs if not noise(output)]


def notebook_html(notebook, name: str) -> tuple[str, str]:
    """(the page, its CSS): the page links ``CSS_FILE`` where nbconvert inlined its stylesheets."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", extra_loaders=[DictLoader({"offline.html.j2": _TEMPLATE})],
                            template_file="offline.html.j2")
    page, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": name},
                                                               "notebook_sha256": notebook_sha256(notebook)})
    head_end = page.index("</head>")
    head, body = page[:head_end], page[head_end:]
    css = "\n".join(style.strip() for style in _HEAD_STYLE.findall(head))
    head = _HEAD_STYLE.sub("", head) + f'\n<link rel="stylesheet" href="{CSS_FILE}">\n'
    return head + body, css + "\n"


def render(paths: list[Path], out: Path, executed: Path = EXECUTED, execute: bool = True) -> list[Path]:
    from plotly.offline import get_plotlyjs

    out.mkdir(parents=True, exist_ok=True)
    executed.mkdir(parents=True, exist_ok=True)
    written, stylesheets = [], set()
    for path in paths:
        started = time.perf_counter()
        if execute:
            with tempfile.TemporaryDirectory(prefix=f"{path.stem}-") as workdir:
                nbformat.write(execute_notebook(path, Path(workdir)), executed / path.name)
        elif not (executed / path.name).is_file():
            sys.exit(f"render_notebooks: {executed / path.name} is missing; run without --no-execute first")
        # Always rendered from the saved copy (its JSON keys sorted): --no-execute gives the same page.
        notebook = nbformat.read(executed / path.name, as_version=4)
        drop_kernel_noise(notebook)
        n_figures = plotly_outputs_to_html(notebook)
        page, css = notebook_html(notebook, path.stem)
        stylesheets.add(css)
        target = out / f"{path.stem}.html"
        target.write_text(page, encoding="utf-8")
        written.append(target)
        done = "executed and rendered" if execute else "rendered"
        seconds = time.perf_counter() - started
        print(f"{target}: {n_figures} figures, {len(page) / 1e3:.0f} kB, {done} in {seconds:.0f} s",
              flush=True)
    # One stylesheet serves every page: the same template and nbconvert wrote them all.
    assert len(stylesheets) == 1, "the pages' stylesheets differ; they cannot share one file"
    (out / CSS_FILE).write_text(stylesheets.pop(), encoding="utf-8")
    (out / PLOTLY_FILE).write_text(get_plotlyjs(), encoding="utf-8")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook names (stems) to render [default: all]")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--executed", type=Path, default=EXECUTED,
                        help="where the executed notebooks are kept")
    parser.add_argument("--no-execute", action="store_true",
                        help="render the executed notebooks kept in --executed instead of running them")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    if args.names:
        unknown = set(args.names) - {p.stem for p in paths}
        if unknown:
            sys.exit(f"render_notebooks: no notebook named {sorted(unknown)}; "
                     f"there are {[p.stem for p in paths]}")
        paths = [p for p in paths if p.stem in args.names]
    render(paths, args.out, args.executed, execute=not args.no_execute)


if __name__ == "__main__":
    main()
