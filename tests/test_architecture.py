"""The package's shape, as docs/ARCHITECTURE.md promises it: room sizes, import direction, no cycles."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "fcnseg"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 8  # besides __init__ and __main__
# Lower layers never import higher ones (the style brief's one-way flow).
FORBIDDEN = {
    "fcnseg.models": ("fcnseg.data", "fcnseg.training", "fcnseg.inference", "fcnseg.evaluation", "fcnseg.export",
                      "fcnseg.ops", "fcnseg.cli", "fcnseg.visualize"),
    "fcnseg.ops": ("fcnseg.data", "fcnseg.training", "fcnseg.inference", "fcnseg.evaluation", "fcnseg.export",
                   "fcnseg.cli"),
    "fcnseg.data": ("fcnseg.models", "fcnseg.training", "fcnseg.inference", "fcnseg.evaluation", "fcnseg.export",
                    "fcnseg.cli", "fcnseg.ops"),
    "fcnseg.metrics": ("fcnseg.models", "fcnseg.training", "fcnseg.inference", "fcnseg.cli"),
    "fcnseg.visualize": ("fcnseg.models", "fcnseg.training", "fcnseg.inference", "fcnseg.cli"),
    "fcnseg.runtime": ("fcnseg.models", "fcnseg.data", "fcnseg.training", "fcnseg.inference", "fcnseg.ops",
                       "fcnseg.cli"),
    "fcnseg.constants": ("fcnseg.",),
    # The JAX backend sits beside training and inference; only the CLI reaches it (docs/JAX.md).
    "fcnseg.jax_backend": ("fcnseg.cli", "fcnseg.serving", "fcnseg.reporting"),
    # The web app and the HTML report sit under the CLI only: no library layer imports them.
    "fcnseg.training": ("fcnseg.cli", "fcnseg.serving", "fcnseg.reporting", "fcnseg.jax_backend"),
    "fcnseg.inference": ("fcnseg.cli", "fcnseg.serving", "fcnseg.reporting", "fcnseg.training",
                         "fcnseg.jax_backend"),
    "fcnseg.evaluation": ("fcnseg.cli", "fcnseg.serving", "fcnseg.reporting", "fcnseg.training"),
    "fcnseg.export": ("fcnseg.cli", "fcnseg.serving", "fcnseg.reporting", "fcnseg.training"),
    "fcnseg.serving": ("fcnseg.cli", "fcnseg.training", "fcnseg.reporting"),
    "fcnseg.reporting": ("fcnseg.cli", "fcnseg.serving"),
    "fcnseg.progress": ("fcnseg.models", "fcnseg.data", "fcnseg.training", "fcnseg.inference", "fcnseg.ops",
                        "fcnseg.cli", "fcnseg.evaluation", "fcnseg.export", "fcnseg.visualize"),
}


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts]) if parts else package


def python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(tree: ast.AST, name: str, is_package: bool) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every import anywhere in a module, lazy ones included."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_package else name.split(".")[:-1]
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found += [(base, alias.name) for alias in node.names]
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    files = {module_name(p, root, package): p for p in python_files(root)}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text())
        targets = set()
        for module, imported in imports_of(tree, name, path.name == "__init__.py"):
            if imported and f"{module}.{imported}" in files:
                targets.add(f"{module}.{imported}")
            elif module in files:
                targets.add(module)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph with package ``__init__`` modules removed: they only re-export what they hold, so
    an edge through one is an edge to its submodules, not a cycle of its own."""
    packages = {n for n in graph if (PACKAGE / Path(*n.split(".")[1:]) / "__init__.py").exists()} - {"fcnseg"}
    return {n: {t for t in targets if t not in packages} for n, targets in graph.items() if n not in packages}


def test_no_import_cycles_in_the_package() -> None:
    graph = without_packages(import_graph(PACKAGE, "fcnseg"))
    assert cycles({n: t - {"fcnseg"} for n, t in graph.items()}) == []


def test_no_import_cycles_in_benchmarks_and_experiments() -> None:
    for folder in ("benchmarks", "experiments"):
        graph = import_graph(ROOT / folder, folder)
        # scripts import their siblings by bare name (the folder is on sys.path when run)
        bare = {n.split(".", 1)[1]: n for n in graph}
        for name, path in ((n, ROOT / folder / (n.split(".", 1)[1] + ".py")) for n in list(graph)):
            tree = ast.parse(path.read_text())
            graph[name] |= {bare[m] for m, _ in imports_of(tree, name, False) if m in bare}
            graph[name] -= {name}
        assert cycles(graph) == [], folder


def test_layers_import_one_way() -> None:
    graph = import_graph(PACKAGE, "fcnseg")
    wrong = [f"{source} imports {target}" for source, targets in graph.items() for target in targets
             for layer, banned in FORBIDDEN.items() if source == layer or source.startswith(layer + ".")
             for prefix in banned if target.startswith(prefix) and not target.startswith(layer)]
    wrong += [f"{source} imports {target}" for source, targets in graph.items() for target in targets
              if target.startswith("fcnseg.cli") and not source.startswith("fcnseg.cli") and source != "fcnseg.__main__"]
    assert wrong == []


def test_no_private_names_imported_across_modules() -> None:
    private = []
    for path in python_files(PACKAGE):
        name = module_name(path, PACKAGE, "fcnseg")
        for module, imported in imports_of(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if module.startswith("fcnseg") and imported and imported.startswith("_") and imported != "__version__":
                private.append(f"{name} imports {module}.{imported}")
    assert private == []


def test_top_level_holds_few_modules() -> None:
    modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules


@pytest.mark.parametrize("folder", ["src", "benchmarks", "experiments"])
def test_rooms_are_small(folder: str) -> None:
    too_long = []
    for path in python_files(ROOT / folder):
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.end_lineno - node.body[0].lineno + 1
                if body > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: body of {body} lines")
    assert too_long == []


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":  # a report of every violation, for work in progress
    sys.exit(pytest.main([__file__, "-q", "--no-header", "-p", "no:cacheprovider"]))
