"""The package's import structure: module-level imports only (no import inside a function to
break a cycle), an acyclic import graph between ocz_d2's modules, and a leaf constants module.

Read from the source with ``ast`` (nothing is imported), so it is fast and independent of what
an earlier test imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ocz_d2"

#: Function-local imports of ocz_d2 modules allowed to stay, by file (none today).
LOCAL_IMPORTS_LEFT: dict[str, set[str]] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(module-level, function-local) sets of the ocz_d2 modules that ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    found: dict[bool, set[str]] = {True: set(), False: set()}

    def targets(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        # ``from pkg import sub`` imports the submodule pkg.sub.
        return {base} | {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules}

    def visit(node, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found[local] |= {t for t in targets(child) if t.split(".")[0] == "ocz_d2"}
            visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found[False], found[True]


def _graph() -> dict[str, set[str]]:
    """Module -> the ocz_d2 modules its import runs first: each imported module and its parent
    packages, but not the importer's own parents (they are initialised before it)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        edges = set()
        for target in _imports(name, path, modules)[0]:
            parts = target.split(".")
            edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        graph[name] = {e for e in edges - own - {name} if e in modules}
    return graph


def test_no_function_local_imports_of_the_package():
    modules = _modules()
    local = {}
    for name, path in modules.items():
        inside = _imports(name, path, modules)[1]
        if inside:
            local[str(path.relative_to(PACKAGE))] = inside
    extra = {
        where: names - LOCAL_IMPORTS_LEFT.get(where, set())
        for where, names in local.items()
        if names - LOCAL_IMPORTS_LEFT.get(where, set())
    }
    assert not extra, f"import these at module level: {extra}"


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_constants_is_a_leaf():
    assert _graph()["ocz_d2.constants"] == set()
    tree = ast.parse((PACKAGE / "constants.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]  # fmt: skip
