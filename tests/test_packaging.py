"""Packaging: what a daemon needs is all a plain install brings; the benchmarks' packages are the
[bench] extra, and `fednode-bench` without them says so in one line."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from tools.bench_cli import BENCH_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _dist(requirement: str) -> str:
    return requirement.split(">")[0].split("=")[0].split("<")[0].strip().replace("-", "_").lower()


def test_bench_packages_are_the_bench_extra_and_not_the_daemons_dependencies():
    bench = {_dist(r) for r in PROJECT["optional-dependencies"]["bench"]}
    assert bench == set(BENCH_PACKAGES)
    assert not bench & {_dist(r) for r in PROJECT["dependencies"]}
    assert bench <= {_dist(r) for r in PROJECT["optional-dependencies"]["dev"]}  # the tests need them


def test_the_package_never_imports_a_bench_package():
    found = []
    for path in sorted((ROOT / "fednode").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in BENCH_PACKAGES]
    assert not found, found


def test_fednode_bench_without_the_extra_names_it_in_one_line():
    code = "import sys; sys.modules['psutil'] = None; import tools.bench_cli"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "psutil" in lines[0] and "fednode[bench]" in lines[0], result.stderr


def test_the_licence_file_is_the_licence_the_package_declares():
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    head = (ROOT / "LICENSE").read_text().split("\n", 3)[:3]
    assert "Apache License" in head[0] and "Version 2.0" in head[1], head
