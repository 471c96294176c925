"""Benchmarks and the experiment harnesses use the library's public names only: no attribute
of another object whose name starts with one underscore (``trainer._backward``,
``model._live()``), no such name through ``getattr``/``hasattr``/``setattr``, and no import
of a ``_private`` name from ``recsys``. Checked on the source with `ast`, nothing is run."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("recsys/experiments/*.py")])
#: the names a class may use for itself
OWN = {"self", "cls"}


def _private(name: str) -> bool:
    """One leading underscore, not a dunder (``__init__``) nor ``_`` itself."""
    return name.startswith("_") and not name.startswith("__") and name != "_"


def private_uses(source: str, filename: str = "<source>") -> list[str]:
    """``"line: what"`` for every private name ``source`` reaches into."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in OWN):
                found.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2:
            target, name = node.args[0], node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and _private(name.value) \
                    and not (isinstance(target, ast.Name) and target.id in OWN):
                found.append(f"{node.lineno}: {node.func.id}(..., {name.value!r})")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "recsys":
            if any(_private(part) for part in node.module.split(".")):
                found.append(f"{node.lineno}: from {node.module}")
            found += [f"{node.lineno}: from {node.module} import {a.name}" for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [f"{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "recsys" and any(_private(p) for p in a.name.split("."))]
    return found


def test_there_are_files_to_check():
    names = {p.name for p in CHECKED}
    assert {"rollback_rec.py", "optim_noise.py", "rec_rollback.py", "faithfulness.py"} <= names


@pytest.mark.parametrize("path", CHECKED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_uses_public_names_only(path):
    found = private_uses(path.read_text(), str(path))
    assert not found, f"{path.relative_to(ROOT)} reaches into private names:\n" + "\n".join(found)


@pytest.mark.parametrize("source, caught", [
    ("trainer._backward(m)", True),
    ("x = model._live()[0]", True),
    ("opt._per_example = {}", True),
    ("hasattr(model, '_generator')", True),
    ("from recsys.experiments.faithfulness import _corr", True),
    ("import recsys._hidden", True),
    ("self._cache = 1", False),
    ("model.live()", False),
    ("x.__class__", False),
    ("from results_file import write_json", False),
])
def test_the_check_catches_private_access(source, caught):
    assert bool(private_uses(source)) == caught
