"""The source keeps the shape the README's architecture section promises.

Files ≤ 500 lines, functions ≤ 60 lines, classes ≤ 250 lines (source only: tests may hold longer
tables of cases), a docstring on every module and public class, and no module left at the top of
services/ besides the math, the config and the step's contracts.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = [p for d in ("services", "controller", "reward_server", "scripts") for p in sorted((ROOT / d).rglob("*.py"))]
MAX_FILE, MAX_FUNCTION, MAX_CLASS = 500, 60, 250


def _nodes(path: Path):
    tree = ast.parse(path.read_text())
    return tree, [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def test_the_source_tree_was_found():
    assert len(SOURCE) > 50


def test_files_functions_and_classes_stay_within_their_size():
    over = []
    for path in SOURCE:
        rel = path.relative_to(ROOT)
        n = len(path.read_text().splitlines())
        if n > MAX_FILE:
            over.append(f"{rel}: {n} lines (max {MAX_FILE})")
        for node in _nodes(path)[1]:
            size = node.end_lineno - node.lineno + 1
            limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
            if size > limit:
                over.append(f"{rel}:{node.lineno} {node.name}: {size} lines (max {limit})")
    assert not over, "\n".join(over)


def test_every_module_and_public_class_has_a_docstring():
    missing = []
    for path in SOURCE:
        rel = path.relative_to(ROOT)
        tree, nodes = _nodes(path)
        if path.stat().st_size and ast.get_docstring(tree) is None and path.name != "__main__.py":
            missing.append(f"{rel}: module")
        for node in nodes:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and ast.get_docstring(node) is None:
                missing.append(f"{rel}:{node.lineno} class {node.name}")
    assert not missing, "\n".join(missing)


def test_services_has_one_folder_per_role():
    top = sorted(p.name for p in (ROOT / "services").iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "algorithm.py", "config.py", "contracts.py"]
    roles = sorted(p.name for p in (ROOT / "services").iterdir() if p.is_dir() and p.name != "__pycache__")
    assert roles == ["backends", "cli", "data", "experiments", "learner", "loop", "model", "rollout"]
