"""The shape of the code: no import cycles in shared/ or services/, no oversized library module.

An import edge is read from the source (every ``import``, at module or function level, outside
``if TYPE_CHECKING:``): ``import a.b`` and ``from a.b import c`` are edges to ``a.b``, and
``from a.b import c`` is also an edge to ``a.b.c`` when that is a module. So a private module that
does ``from its_package import _sibling`` depends on its package's ``__init__``: a cycle when that
``__init__`` imports it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services")
MAX_LIBRARY_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_imports(child))
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _runtime_imports(node)


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
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

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_private_module_importing_its_own_package(tmp_path: Path) -> None:
    """The rule the tree is held to, on a made-up package: ``__init__`` imports ``_a``, and ``_a``
    takes a sibling through the package's namespace."""
    edges = {"pkg": {"pkg._a"}, "pkg._a": {"pkg", "pkg._b"}, "pkg._b": set()}
    assert _cycles(edges) == [["pkg", "pkg._a"]]
    edges["pkg._a"] = {"pkg._b"}
    assert _cycles(edges) == []


def test_no_import_cycle_in_shared_or_services() -> None:
    """No module reaches itself through imports, at any level (function-level imports included)."""
    assert _cycles(_edges(_modules())) == []


def test_the_edges_are_read_from_the_real_tree() -> None:
    """The reader resolves real imports (so the cycle check is not vacuous)."""
    edges = _edges(_modules())
    assert "shared.bus.codec" in edges["shared.bus.consumer"]
    assert "shared.redis.boundary" in edges["shared.bus.publisher"]


LIBRARY = sorted((REPO / "shared").rglob("*.py"))


@pytest.mark.parametrize("path", LIBRARY, ids=lambda path: path.relative_to(REPO).as_posix())
def test_library_modules_stay_small(path: Path) -> None:
    """A module of the shared library fits one read: about 400 lines at most."""
    assert len(path.read_text().splitlines()) <= MAX_LIBRARY_LINES


LAYERS = {  # shared/'s layers, as its package docstring states them
    "shared.clock": 1, "shared.config": 1, "shared.errors": 1, "shared.keys": 1, "shared.logging": 1,
    "shared.models": 1, "shared.stop": 1,
    "shared.redis": 2,
    "shared.bus": 3, "shared.portfolio": 3,
    "shared.safety": 4, "shared.brokers": 4,
    "shared.service": 5, "shared.heartbeat": 5,
}


def _layer(module: str) -> int:
    parts = module.split(".")
    for size in range(len(parts), 0, -1):
        if ".".join(parts[:size]) in LAYERS:
            return LAYERS[".".join(parts[:size])]
    raise KeyError(f"{module} has no layer in LAYERS")


def test_shared_imports_only_its_own_layer_or_below() -> None:
    """No library module imports from a layer above its own (shared/__init__.py lists them)."""
    edges = _edges(_modules())
    upward = [(source, target) for source, targets in edges.items() if source.startswith("shared.")
              for target in targets if target != "shared" and _layer(target) > _layer(source)]
    assert upward == []
