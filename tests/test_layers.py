"""The package's import graph: no cycle, and no import from a lower layer up to a higher one.

Built from the source with `ast` (imports under `if TYPE_CHECKING:` are annotations only and
do not count; imports inside functions do).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdexp"

# Lowest first. A module may import modules of its own layer or below.
LAYERS: list[tuple[str, ...]] = [
    (
        "kdexp",
        "kdexp.conf",
        "kdexp.errors",
        "kdexp.seeding",
        "kdexp.resident_memory",
        "kdexp.faults",
        "kdexp.tasks",
        "kdexp.config",
        "kdexp.hardware",
        "kdexp.environment",
        "kdexp.preemption",
        "kdexp.run_folder",
    ),
    (
        "kdexp.cache",
        "kdexp.data",
        "kdexp.inference",
        "kdexp.models",
        "kdexp.tiny_models",
        "kdexp.families",
        "kdexp.metrics",
        "kdexp.model_internals",
        "kdexp.phases",
        "kdexp.losses",
        "kdexp.context",
        "kdexp.loggers",
    ),
    ("kdexp.teacher", "kdexp.decision", "kdexp.internal", "kdexp.smoothing", "kdexp.selection"),
    ("kdexp.methods",),
    ("kdexp.training",),
    ("kdexp.teacher_stage",),
    ("kdexp.run", "kdexp.hub_folder"),
    ("kdexp.report_formats", "kdexp.report_plots"),
    ("kdexp.report", "kdexp.evaluate", "kdexp.preflight"),
    ("kdexp.sweep",),
    ("kdexp.train",),
    ("kdexp.tools",),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.add(child.module)
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {d for d in runtime_imports(ast.parse(path.read_text())) if d in modules and d != name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> int:
    """The layer of a module: the longest listed name it is, or is a submodule of (the package itself, `kdexp`,
    only by name: a module no layer lists fails, so that every new module is placed on purpose)."""
    best = -1, -1
    for index, layer in enumerate(LAYERS):
        for prefix in layer:
            below = module.startswith(prefix + ".") and prefix != "kdexp"
            if (module == prefix or below) and len(prefix) > best[1]:
                best = index, len(prefix)
    if best[0] < 0:
        pytest.fail(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")
    return best[0]


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dependency in sorted(graph[module]):
            if state.get(dependency) == 1:
                cycles.append(path[path.index(dependency) :] + [dependency])
            elif dependency not in state:
                visit(dependency)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_imports_point_down_only() -> None:
    upward = [
        f"{module} (layer {layer_of(module)}) imports {dependency} (layer {layer_of(dependency)})"
        for module, dependencies in import_graph().items()
        for dependency in dependencies
        if layer_of(dependency) > layer_of(module)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_every_module_is_in_a_layer() -> None:
    for module in import_graph():
        layer_of(module)


def test_the_graph_sees_real_imports() -> None:
    graph = import_graph()
    assert "kdexp.training" in graph["kdexp.teacher_stage"] and "kdexp.methods.base" in graph["kdexp.training"]
    assert "kdexp.teacher" not in graph["kdexp.methods.base"]  # a TYPE_CHECKING import only
