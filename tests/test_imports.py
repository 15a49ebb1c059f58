"""Every ``segflow`` import in the code resolves.

Most of segflow's imports are lazy (inside functions, so a CLI command loads only what it runs),
so a moved or renamed module breaks nothing at import time and ruff cannot see it; the import
walk behind the cache keys (``pipeline/keys.py``) would silently skip it too. This reads every
``from segflow... import name`` / ``import segflow...`` with ``ast`` and checks that each one
names a module that exists and, for ``from`` imports, an attribute or submodule it has.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("src/segflow", "flows", "tasks")


def _imports() -> list[tuple[str, int, str, str | None]]:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            where = str(path.relative_to(ROOT))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    if node.module == "segflow" or node.module.startswith("segflow."):
                        found += [(where, node.lineno, node.module, a.name) for a in node.names]
                elif isinstance(node, ast.Import):
                    found += [
                        (where, node.lineno, a.name, None)
                        for a in node.names
                        if a.name == "segflow" or a.name.startswith("segflow.")
                    ]
    return found


IMPORTS = _imports()


def test_the_walk_finds_the_lazy_imports() -> None:
    assert len(IMPORTS) > 100  # a broken walk must not pass by checking nothing
    assert any(m == "segflow.dataset" for _, _, m, _ in IMPORTS)


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in IMPORTS}))
def test_every_imported_segflow_module_exists(module: str) -> None:
    users = [f"{w}:{n}" for w, n, m, _ in IMPORTS if m == module]
    assert importlib.util.find_spec(module) is not None, f"{module} (imported at {users})"


def test_every_imported_name_exists() -> None:
    missing = []
    for where, line, module, name in IMPORTS:
        if name is None or name == "*":
            continue
        mod = importlib.import_module(module)
        if not hasattr(mod, name) and importlib.util.find_spec(f"{module}.{name}") is None:
            missing.append(f"{where}:{line}: from {module} import {name}")
    assert not missing, "\n".join(missing)
