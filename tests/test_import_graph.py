"""The package's imports go one way: applications → library → nothing of the applications; no cycles.

Read from the source (every `import`, lazy ones inside functions included), not from what happens
to be imported at run time, so a cycle hidden behind a function-level import is found too. `kernels/`
is read as what it installs as, `nekomata_core.kernels`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nekomata_core"
KERNELS = REPO / "kernels"  # installed as nekomata_core.kernels (pyproject's package-dir)


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ("nekomata_core", *path.relative_to(REPO).with_suffix("").parts)
    else:
        parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The nekomata_core modules `path` imports, resolved to absolute names."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    # Imports under `if TYPE_CHECKING:` are never executed: they name types for readers and checkers.
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            found.update(n if n in MODULES else target for n in names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


FILES = sorted([*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")])
MODULES = {_module_name(path) for path in FILES}
GRAPH = {_module_name(path): _imports(path) for path in FILES}


LIBRARY = sorted(
    m for m in MODULES if not m.startswith("nekomata_core.apps") and m != "nekomata_core.__main__"
)


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_imports_nothing_from_the_applications(module):
    assert not {m for m in GRAPH[module] if m.startswith("nekomata_core.apps")}


def test_the_graph_reads_the_kernels_and_lazy_imports():
    # A check that sees nothing passes vacuously: the kernels are in it, and a function-level import is an edge.
    assert "nekomata_core.kernels.gpu.attention" in GRAPH and "nekomata_core.kernels.cpu.build" in GRAPH
    assert "nekomata_core.kernels.cpu.step" in GRAPH["nekomata_core.accelerate.steps"]  # imported in functions


def test_the_kernels_know_nothing_of_the_library():
    """kernels/ imports only itself and `backends` (the names of the choices, no imports of its own)."""
    for module in (m for m in MODULES if m.startswith("nekomata_core.kernels")):
        outside = {d for d in GRAPH[module] if not d.startswith("nekomata_core.kernels")}
        assert outside <= {"nekomata_core.backends"}, (module, outside)
    assert GRAPH["nekomata_core.backends"] == set()


def test_no_command_imports_the_dispatcher():
    dispatcher = "nekomata_core.apps.cli"
    # `python -m nekomata_core` (the package's __main__) is the dispatcher's one caller.
    callers = [m for m, deps in GRAPH.items() if dispatcher in deps and m != "nekomata_core.__main__"]
    assert callers == []


def test_the_package_has_no_import_cycle():
    # Package __init__ files re-export their modules; an edge into an __init__ is not a cycle by itself.
    graph = {
        m: {d for d in deps if d not in ("nekomata_core", "nekomata_core.apps")} for m, deps in GRAPH.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep) :] + [dep]
                pytest.fail("import cycle: " + " → ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_model_file_is_the_architecture_only():
    """model.py imports PyTorch and the config/cache/input checks, nothing that makes it fast."""
    tree = ast.parse((PACKAGE / "model.py").read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported <= {
        "__future__",
        "math",
        "dataclasses",
        "torch",
        "torch.nn.functional",
        "torch.nn",
        ".cache",
        ".config",
        ".embeddings",
        ".inputs",
    }, imported
