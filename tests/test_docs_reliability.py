"""Every test that docs/reliability.md names exists: the table may not point at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_referenced_test_exists():
    text = (ROOT / "docs" / "reliability.md").read_text()
    refs = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)) - {("tests/test_x.py", "name")}  # the legend
    assert len(refs) > 50, "the reliability table lost its rows"
    missing = []
    for path, name in sorted(refs):
        tree = ast.parse((ROOT / path).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        if name not in names:
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
    for path in set(re.findall(r"`(tests/[\w/]+\.py)`", text)) - {"tests/test_x.py"}:
        assert (ROOT / path).exists(), path
