"""The shape of train/: short functions, and modules that import each other one way only."""

from __future__ import annotations

import ast
import graphlib

from tests.support import REPO

TRAIN = REPO / "train"


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(TRAIN.glob("*.py"))}


def test_no_function_in_train_is_over_60_lines() -> None:
    long = [f"train/{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None
            and node.end_lineno - node.lineno + 1 > 60]
    assert long == []


def test_train_modules_import_each_other_without_a_cycle() -> None:
    """Counting imports inside functions too: a cycle hidden in a lazy import is still a cycle."""
    graph: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        imports = graph.setdefault(name, set())
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "train":
                    targets = [a.name for a in node.names]
                elif node.module.startswith("train."):
                    targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("train.")]
            imports.update(t for t in targets if t != name)
    assert {"budget", "features", "publishing"} <= graph["pipeline"] and "splits" in graph["optimize"]  # it is real
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from exc
