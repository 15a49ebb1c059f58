"""Generated documentation must match the code it is generated from."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_architecture_module_map_is_current() -> None:
    arch = _script("render_architecture")
    text = arch.DOC.read_text()
    assert arch.rewrite(text) == text, "run: python scripts/render_architecture.py"


def test_the_module_map_lists_every_module_and_its_imports() -> None:
    arch = _script("render_architecture")
    block = arch.render()
    assert "| `segflow.flows.train` |" in block and "| `segflow.tasks.gate` |" in block
    row = next(line for line in block.splitlines() if line.startswith("| `segflow.crops` |"))
    assert "`masks`" in row and "`storage`" in row  # what crops.py imports
