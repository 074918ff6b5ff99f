"""The layers stay apart, checked over the package's import graph (every import in the source,
lazy ones inside functions included), not over a list of allowed lines:

    core (kdtune.*) < search (kdtune.search) < analysis (kdtune.analysis) < cli (kdtune.cli)

A module may import its own layer and those below it, never one above. The core (one
distillation run) runs on a machine with torch alone; the search layer adds Ray, Optuna and
MLflow; the analysis reads searches; the command line calls all of them. Entry points
(``__main__.py`` modules and ``if __name__ == "__main__":`` blocks, what ``python -m kdtune.X``
runs) belong to the command line: they are never imported. The graph has no cycle either."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import kdtune

LAYERS = ("core", "search", "analysis", "cli")  # lowest first
# torchvision too: its ops import torch._dynamo (1.5 s of CPU); only a tv_* model needs it
HEAVY = ("ray", "mlflow", "optuna", "torchvision")
ROOT = Path(kdtune.__file__).parent


def layer(module: str) -> str:
    for name in LAYERS[1:]:
        if module == f"kdtune.{name}" or module.startswith(f"kdtune.{name}."):
            return name
    return "core"


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                    for c in test.comparators))


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth (functions, methods, conditionals), except
    inside ``if __name__ == "__main__":``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_main_guard(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    """{module: {imported kdtune module: line}} over the package at ``root``."""
    mods = modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {m: {} for m in mods}
    for module, path in mods.items():
        if module.endswith("__main__"):
            continue  # an entry point: never imported
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # `from kdtune.search import driver` imports the module kdtune.search.driver
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in names:
                target = resolve(name) if name.split(".")[0] == root.name else None
                if target is not None and target != module:
                    graph[module].setdefault(target, node.lineno)
    return graph


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{m} ({layer(m)}) imports {t} ({layer(t)}) at line {line}"
            for m, targets in sorted(graph.items()) for t, line in sorted(targets.items())
            if rank[layer(t)] > rank[layer(m)]]


def cycles(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_layer_imports_a_layer_above_it() -> None:
    assert upward_imports(import_graph()) == []


def test_the_import_graph_has_no_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_contract_sees_lazy_imports_and_spares_entry_points(tmp_path: Path) -> None:
    package = tmp_path / "kdtune"
    for folder in ("search", "cli"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "search" / "driver.py").write_text("from kdtune import engine\n")
    (package / "cli" / "search.py").write_text("def run():\n    from kdtune.search import driver\n")
    (package / "engine.py").write_text(
        "import os\n\ndef helper():\n    if os:\n        from .search.driver import execute\n\n"
        "if __name__ == '__main__':\n    from kdtune.cli import search\n")
    (package / "train.py").write_text("from kdtune import engine\n")
    (package / "__main__.py").write_text("from kdtune.cli import search\n")
    graph = import_graph(package)
    assert upward_imports(graph) == ["kdtune.engine (core) imports kdtune.search.driver (search) at line 5"]
    assert cycles(graph) == [{"kdtune.engine", "kdtune.search.driver"}]


def imported_after(code: str) -> set[str]:
    check = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True, text=True,
                         timeout=120).stdout.strip()
    return set(filter(None, out.split(",")))


def test_core_imports_no_search_stack() -> None:
    core = ("config data engine teachers sampling run registry plugins train logs models distillers "
            "distillers.sakd distillers.ctkd distillers.feature").split()
    assert imported_after("\n".join(f"import kdtune.{m}" for m in core)) == set()


def test_search_and_analysis_packages_import_lazily() -> None:
    assert imported_after("import kdtune.search, kdtune.search.spec, kdtune.search.space, kdtune.analysis") == set()
