"""Layers import only downward: the import-linter contract in pyproject.toml (lazy imports count too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_layer_contract_is_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_every_module_has_a_layer():
    """A module outside the contract would be free to import anything: each top-level module or package is in it."""
    import tomllib

    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    placed = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    package = ROOT / "rlhf"
    modules = {f"rlhf.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    modules |= {f"rlhf.{p.parent.name}" for p in package.glob("*/__init__.py")}
    assert modules - placed == set()
