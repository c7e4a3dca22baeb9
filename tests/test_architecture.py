"""The package's import graph keeps its layers: no import cycle, ``tables/`` free of torch and of
the influence math, ``influence/`` free of the trainer, the pipeline and the CLI, Ray only in
``pipeline/``. Read from the source (ast), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ecif_ray"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every module ``path`` imports: ecif_ray modules by full name (``from pkg import submodule``
    names the submodule), others by their top-level package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name if alias.name.startswith("ecif_ray") else alias.name.split(".")[0]
                      for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if not node.module.startswith("ecif_ray"):
                found.add(node.module.split(".")[0])
                continue
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for child in sorted(graph[node] & graph.keys()):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = stack[stack.index(node):]
            del stack[stack.index(node):]
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += [child for child in graph.get(node, ()) if child.startswith("ecif_ray")]
    return seen


def in_package(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_tables_need_neither_torch_nor_the_influence_math():
    graph = import_graph()
    for module in (m for m in graph if in_package(m, "ecif_ray.tables")):
        upward = {d for d in graph[module] if in_package(d, "ecif_ray.influence", "ecif_ray.models",
                                                        "ecif_ray.pipeline", "ecif_ray.training")}
        assert not upward, f"{module} imports {sorted(upward)}"
        with_torch = sorted(m for m in reachable(graph, module) if "torch" in graph.get(m, ()))
        assert not with_torch, f"{module} reaches torch through {with_torch}"


def test_influence_imports_nothing_above_it():
    graph = import_graph()
    above = ("ecif_ray.training", "ecif_ray.pipeline", "ecif_ray.cli", "ecif_ray.evaluation", "ecif_ray.report",
             "ecif_ray.demo", "ecif_ray.fidelity")
    for module in (m for m in graph if in_package(m, "ecif_ray.influence")):
        upward = sorted(d for d in graph[module] if in_package(d, *above))
        assert not upward, f"{module} imports {upward}"


def test_ray_only_in_the_pipeline():
    graph = import_graph()
    with_ray = sorted(m for m, deps in graph.items() if "ray" in deps and not in_package(m, "ecif_ray.pipeline"))
    assert not with_ray, f"Ray imported outside ecif_ray.pipeline: {with_ray}"


def test_the_checks_see_a_cycle_and_a_torch_import():
    graph = {"ecif_ray.a": {"ecif_ray.b"}, "ecif_ray.b": {"ecif_ray.c", "torch"}, "ecif_ray.c": {"ecif_ray.a"},
             "ecif_ray.d": {"ecif_ray.a"}}
    assert cycles(graph) == [["ecif_ray.a", "ecif_ray.b", "ecif_ray.c"]]
    assert reachable(graph, "ecif_ray.d") == set(graph)


def test_the_config_the_cli_parsers_and_the_tables_load_without_torch():
    """Building `ecif-ray --help` or reading a run's tables must not pay torch's import (~1.3 s)."""
    import subprocess
    import sys

    code = ("import sys, ecif_ray.cli.score, ecif_ray.cli.trace, ecif_ray.config, ecif_ray.tables.rows; "
            "loaded = sorted(m for m in ('torch', 'webdataset') if m in sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
