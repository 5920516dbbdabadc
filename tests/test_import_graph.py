"""vitkit's modules import each other one way only: no import cycle, counting imports inside functions.

A cycle hidden behind a function-level import still means two modules that cannot be read (or changed) apart,
and it breaks as soon as someone hoists the import to the top of the file. The graph is read from the source with
`ast`, so nothing is imported; `if TYPE_CHECKING:` blocks are skipped because they never run.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import networkx as nx

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "vitkit"


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    """`vitkit/infer/export.py` -> `vitkit.infer.export`; a package's `__init__.py` is the package itself."""
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth (functions, methods, try blocks), except under TYPE_CHECKING."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if _is_type_checking_block(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return found


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The vitkit modules that `module` imports. `from pkg import name` counts `pkg.name` when that is a module."""
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        origin = ".".join(base + ([node.module] if node.module else []))
        for alias in node.names:
            submodule = f"{origin}.{alias.name}"
            targets.add(submodule if submodule in known else origin)
    return {t for t in targets if t in known and t != module}


def import_graph(root: Path = PACKAGE_ROOT) -> nx.DiGraph:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for target in imported_modules(path.read_text(), module, is_package, set(files)):
            graph.add_edge(module, target)
    return graph


def import_cycles(graph: nx.DiGraph, limit: int = 20) -> list[list[str]]:
    """Up to `limit` cycles, each as [a, b, ...]: a imports b, ..., the last imports a."""
    return list(itertools.islice(nx.simple_cycles(graph), limit))


def test_vitkit_has_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles (each module imports the next, the last the first):\n" + "\n".join(
        " -> ".join(c) for c in cycles
    )


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "vitkit"
    (pkg / "infer").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "infer" / "__init__.py").write_text("")
    (pkg / "infer" / "export.py").write_text("def check():\n    from .onnx_backend import OnnxModel\n")
    (pkg / "infer" / "onnx_backend.py").write_text("from . import export\n")
    (pkg / "infer" / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .. import infer\n"
    )
    graph = import_graph(pkg)
    assert set(graph.edges) == {
        ("vitkit.infer.export", "vitkit.infer.onnx_backend"),
        ("vitkit.infer.onnx_backend", "vitkit.infer.export"),
    }
    assert [set(c) for c in import_cycles(graph)] == [{"vitkit.infer.export", "vitkit.infer.onnx_backend"}]
