"""The package's shape: no module under abft_lens/ or analysis/ imports, directly or through other
modules, one that imports it back. Read from the source (ast), so it covers imports inside functions
too (a lazy import still closes a cycle) and needs no model."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("abft_lens", "analysis")


def module_files(root: Path = ROOT, packages=PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py file of ``packages`` (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of ``modules`` it imports anywhere in its file. Importing ``a.b.c`` also
    runs the packages ``a`` and ``a.b`` (their ``__init__``), so they count too, except the importing
    module's own packages (already being imported when it runs)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets.add(source)
                targets |= {f"{source}.{alias.name}" for alias in node.names}  # a submodule imported by name
        own = set(_ancestors(name)) | {name}
        edges = set()
        for target in targets:
            for candidate in [*_ancestors(target), target]:
                if candidate in modules and candidate not in own:
                    edges.add(candidate)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_cycle_finder_finds_a_two_module_cycle(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from pkg.b import f\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import a\n")
    (tmp_path / "pkg" / "c.py").write_text("from . import a\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b"]]


def test_importing_a_submodule_runs_its_package_init(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "low.py").write_text("from pkg.sub.part import g\n")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("from pkg.sub.job import run\n")
    (tmp_path / "pkg" / "sub" / "part.py").write_text("")
    (tmp_path / "pkg" / "sub" / "job.py").write_text("from pkg.low import x\n")
    graph = import_graph(module_files(tmp_path, ("pkg",)))
    assert find_cycles(graph) == [["pkg.low", "pkg.sub", "pkg.sub.job"]]


def test_no_module_of_abft_lens_or_analysis_imports_in_a_cycle():
    cycles = find_cycles(import_graph(module_files()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_abft_lens_never_imports_analysis():
    graph = import_graph(module_files())
    offenders = sorted(name for name, edges in graph.items()
                       if name.startswith("abft_lens") and any(e.split(".")[0] == "analysis" for e in edges))
    assert not offenders, f"abft_lens modules importing analysis: {offenders}"
