"""Imports flow one way: common <- registry <- {trainer, evals, serving} <- platform (the CLI on top).

Every ``loraplane.*`` import in a component folder, at module level or inside a function, is read
with ``ast`` and checked against the layer table; one wrong import names its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each component may import besides itself.
ALLOWED: dict[str, set[str]] = {
    "common": set(),
    "registry": {"common"},
    "trainer": {"common", "registry"},
    "evals": {"common", "registry"},
    "serving": {"common", "registry"},
    "platform": {"common", "registry", "trainer", "evals", "serving"},
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, component) for every ``loraplane.<component>`` this file imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "loraplane" and len(parts) > 1 and parts[1] in ALLOWED:
                found.append((node.lineno, parts[1]))
    return found


def layer_violations(root: Path) -> list[str]:
    wrong = []
    for component, allowed in ALLOWED.items():
        for path in sorted((root / component).rglob("*.py")):
            for line, target in imports_of(path):
                if target != component and target not in allowed:
                    wrong.append(f"{path.relative_to(root)}:{line} imports loraplane.{target}")
    return wrong


def test_every_component_imports_only_the_layers_below_it() -> None:
    assert layer_violations(ROOT) == []


def test_a_wrong_way_import_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    for component in ALLOWED:
        (tmp_path / component).mkdir()
    (tmp_path / "registry" / "ok.py").write_text("from loraplane.common.errors import LoraplaneError\n")
    (tmp_path / "serving" / "bad.py").write_text(
        "import json\n\ndef f():\n    from loraplane.platform.cli import app\n"
    )
    (tmp_path / "trainer" / "peer.py").write_text("import loraplane.serving.preflight\n")
    assert layer_violations(tmp_path) == [
        "trainer/peer.py:1 imports loraplane.serving",
        "serving/bad.py:4 imports loraplane.platform",
    ]


@pytest.mark.parametrize("component", sorted(ALLOWED))
def test_each_component_folder_holds_python_modules(component: str) -> None:
    assert any((ROOT / component).rglob("*.py")), component
