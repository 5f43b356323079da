"""Each package's modules import one another without a circle (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "swc_service": ROOT / "swc_service/src/swc_service",
    "visloc_export": ROOT / "export/src/visloc_export",
    "visloc_client": ROOT / "client/src/visloc_client",
}


def module_graph(package: str, folder: Path) -> dict[str, set[str]]:
    """Module name (dotted, under ``package``) -> the package's modules it imports, anywhere in it."""
    modules = {
        ".".join(p.relative_to(folder).with_suffix("").parts).removesuffix(".__init__"): p for p in folder.rglob("*.py")
    }
    modules = {name or "__init__": path for name, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                    target = [*base, *(node.module.split(".") if node.module else [])]
                elif node.module and (node.module == package or node.module.startswith(package + ".")):
                    target = node.module.split(".")[1:]
                else:
                    continue
                for alias in node.names:  # `from . import x` names a module, `from .m import f` does not
                    candidates = [".".join([*target, alias.name]), ".".join(target)]
                    deps.add(next((c for c in candidates if c in modules), ".".join(target)))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(package + "."):
                        deps.add(alias.name.split(".", 1)[1])
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk meets, as the modules along it (the first repeated at the end)."""
    found, state = [], {}

    def walk(node: str, path: list[str]) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, path)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [])
    return found


def test_the_walk_finds_a_circle_and_sees_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = module_graph("pkg", pkg)
    assert graph["a"] == {"b"} and graph["b"] == {"c"} and graph["c"] == {"a"}
    assert cycles(graph) == [["a", "b", "c", "a"]]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_circle(package):
    graph = module_graph(package, PACKAGES[package])
    assert len(graph) > 5  # the walk saw the package
    assert cycles(graph) == []
