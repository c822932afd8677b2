"""The README's two commands are the project's promises: keep them and CI in step."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _command_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python3 -m venv .venv")]


def test_ci_runs_exactly_the_readme_test_command():
    readme = _command_lines((ROOT / "README.md").read_text())
    ci = _command_lines((ROOT / ".ci" / "run").read_text())
    assert len(readme) >= 2, "README must start with the demo command and the test command"
    assert ci == [readme[1]]


def test_readme_demo_command_runs_the_demo_and_pins_cpu_torch():
    demo, tests = _command_lines((ROOT / "README.md").read_text())[:2]
    assert demo.endswith("fednode demo") and "torch==2.13.0" in demo
    assert "pytest" in tests and "torch==2.13.0" in tests
