"""No import cycle among the modules of the ``pipeline`` package.

A cycle makes a module's names depend on which of the two is imported first, and it hides a layer
that should sit apart. The graph is read from the source with ast: the imports a module runs when
it is imported (its top level, and class bodies and blocks there), not those inside functions,
which run later, nor those under ``if TYPE_CHECKING:``, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "pipeline"

Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _run_on_import(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The import statements executed when a module with this body is imported."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                found += _run_on_import(node.body)
            found += _run_on_import(node.orelse)
        elif isinstance(node, ast.ClassDef | ast.With):
            found += _run_on_import(node.body)
        elif isinstance(node, ast.Try):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                found += _run_on_import(block)
    return found


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> Graph:
    """Module -> the package's modules it imports when it is imported."""
    paths = {_module_name(p): p for p in (root / package).rglob("*.py")}
    graph: Graph = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _run_on_import(ast.parse(path.read_text(), filename=str(path)).body):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            base = node.module or ""
            if node.level:  # relative: from the module's own package, up level - 1 more
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # `from pkg import sub` imports the submodule; `from mod import name` the module.
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in paths else base)
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle through each strongly connected component that has one, as [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm; the package is small enough to recurse
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: Graph, component: set[str]) -> list[str]:
    """A shortest way back to its first module, inside the component (breadth first)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]  # no self-loops: import_graph drops them
                if w not in came_from:
                    came_from[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle in the component {sorted(component)}")


def test_find_cycles_finds_each_cycle_and_only_cycles() -> None:
    graph: Graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}, "g": {"a"}}
    assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_the_imports_that_run_at_import_time() -> None:
    graph = import_graph()
    assert "pipeline.models" in graph["pipeline.queries.report"]
    assert "pipeline.api.app" in graph["pipeline.api"]  # `from pipeline.api.app import ...` in __init__
    assert "pipeline.queries.history" in graph["pipeline.cli.history"]  # `from pipeline.queries import history`
    assert "pipeline.flow.runtime" not in graph["pipeline.cli.operate"]  # imported inside a command only
    assert sum(map(len, graph.values())) > 50


def test_no_import_cycle_in_the_package() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in the package (module-level imports): " + "; ".join(
        " -> ".join(cycle) for cycle in cycles)
