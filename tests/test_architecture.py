"""The package's layers, as docs/architecture.md draws them, checked on the import graph.

Every import counts, lazy ones inside functions too: a lazy import is still a
dependency, only a cheaper one at start-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xorweights"
# Ground modules every layer may use; they import nothing of ours but each other.
GROUND = {
    "errors",
    "progress",
    "sizes",
    "locks",
    "inputs",
    "outdir",
    "overlap",
    "printable",
    "interrupts",
    "torch_import",
}
JOBS = {
    "encode",
    "encode_plan",
    "exposure",
    "renames",
    "decode",
    "decode_state",
    "load",
    "checksums",
    "report",
    "legacy",
    "demo",
    "fixtures",
}


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """``module -> modules of ours it imports``, names relative to the package ('' is the package itself)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module(path)
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                anchor = package[: len(package) - (node.level - 1)]
                base = [*anchor, *(node.module.split(".") if node.module else [])]
                if node.module is None:  # from . import x: x may be a module
                    for alias in node.names:
                        candidate = ".".join([*base, alias.name])
                        found.add(
                            candidate if (PACKAGE / (candidate.replace(".", "/") + ".py")).exists() else ".".join(base)
                        )
                else:
                    found.add(".".join(base))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found |= {n.removeprefix("xorweights.") for n in names if n.startswith("xorweights.")}
        graph[name] = found - {name, ""}
    return graph


GRAPH = _imports()


def _layer(module: str) -> str:
    top = module.split(".")[0]
    if top in ("readers", "delta", "hub"):
        return top
    if top in GROUND:
        return "ground"
    if top in JOBS:
        return "jobs"
    return top  # cli, __main__, the package itself


def test_every_module_has_a_layer() -> None:
    known = {"readers", "delta", "hub", "ground", "jobs", "cli", "entry", "__main__"}
    assert {m for m in GRAPH if m and _layer(m) not in known} == set()


@pytest.mark.parametrize(
    ("layer", "may_use"),
    [
        ("ground", {"ground"}),
        ("readers", {"ground", "readers"}),
        ("delta", {"ground", "readers", "delta"}),
        ("hub", {"ground", "readers", "delta", "hub"}),
        ("jobs", {"ground", "readers", "delta", "hub", "jobs"}),
    ],
)
def test_a_layer_imports_only_the_layers_below_it(layer: str, may_use: set[str]) -> None:
    wrong = sorted(
        f"{m} imports {dep}"
        for m, deps in GRAPH.items()
        if m and _layer(m) == layer
        for dep in deps
        if _layer(dep) not in may_use
    )
    assert wrong == []


def test_there_are_no_import_circles() -> None:
    circles: list[str] = []

    def walk(node: str, path: list[str]) -> None:
        for dep in sorted(GRAPH.get(node, ())):
            if dep in path:
                circles.append(" -> ".join([*path[path.index(dep) :], dep]))
            elif len(path) < 40:
                walk(dep, [*path, dep])

    for module in sorted(GRAPH):
        if module:
            walk(module, [module])
    assert circles == []


def test_the_graph_is_read() -> None:
    """The checks above see real edges: a graph read wrongly would pass them all."""
    assert "delta.kernel" in GRAPH["decode"]
    assert "readers.tensor_ref" in GRAPH["readers.meta_llama"]
    assert "hub.refs" in GRAPH["hub.client"]
