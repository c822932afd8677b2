"""tools/report.py: the shared benchmark report writer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from tools import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_metadata_has_provenance():
    meta = report.run_metadata("fednode-bench throughput --preset tiny-cpu", seeds=[0, 1], preset="tiny-cpu",
                               threads=2)
    assert meta["command"] == "fednode-bench throughput --preset tiny-cpu"
    assert meta["seeds"] == [0, 1] and meta["preset"] == "tiny-cpu" and meta["threads"] == 2
    assert meta["date_utc"].endswith("Z") and len(meta["date_utc"]) == 20
    machine = meta["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and machine["ram_gib"] > 0
    assert isinstance(machine["gpus"], list)
    versions = meta["versions"]
    for key in ("python", "torch", "transformers", "fednode", "grpcio"):
        assert key in versions
    assert versions["torch"] and versions["transformers"] and versions["fednode"]
    json.dumps(meta)  # serialisable as is


def test_command_line_is_shell_quoted():
    assert report.command_line(["/usr/bin/fednode-bench", "throughput", "--out", "a b"]) == (
        "fednode-bench throughput --out 'a b'")


def test_write_report_writes_valid_json_and_markdown(tmp_path):
    out = tmp_path / "deep" / "dir"
    data = {"value": 1.5, "nan": math.nan, "path": Path("/x"), "items": (1, 2)}
    paths = report.write_report(out, "bench", data, "# Title\n\ntext")
    assert paths == {"json": out / "bench.json", "md": out / "bench.md"}
    loaded = json.loads(paths["json"].read_text())
    assert loaded == {"value": 1.5, "nan": None, "path": "/x", "items": [1, 2]}
    assert paths["md"].read_text() == "# Title\n\ntext\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_write_report_overwrites_atomically(tmp_path):
    report.write_report(tmp_path, "r", {"v": 1}, "one")
    report.write_report(tmp_path, "r", {"v": 2}, "two")
    assert json.loads((tmp_path / "r.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_write_report_refuses_a_file_as_out_dir(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")
    with pytest.raises(report.ReportError, match="is a file, not a directory"):
        report.write_report(target, "r", {}, "")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_write_report_refuses_unwritable_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(report.ReportError, match="not writable"):
            report.write_report(locked, "r", {}, "")
    finally:
        locked.chmod(0o700)


def test_report_error_is_one_line_and_nonzero_in_a_cli(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("x")

    @click.command()
    def cmd() -> None:
        report.write_report(target, "r", {}, "")

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "is a file" in lines[0] and "Traceback" not in result.output


def test_markdown_table_formats_cells():
    text = report.markdown_table(["name", "tok/s", "ok"], [["a|b", 1234.5, True], ["c", None, False], ["d", 2.345, 1]])
    lines = text.splitlines()
    assert lines[0] == "| name | tok/s | ok |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1,234 | yes |"  # 1234.5 rounds half to even
    assert lines[3] == "| c | – | no |"
    assert lines[4] == "| d | 2.35 | 1 |"
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        report.markdown_table(["a", "b"], [["x"]])


def test_plots_write_png(tmp_path):
    bar = report.bar_plot(tmp_path / "bar.png", ["a", "b"], [1.0, 2.5], "tok/s", "speed", errors=[0.1, 0.2])
    line = report.line_plot(tmp_path / "sub" / "line.png", {"x": ([1, 2, 3], [3.0, 2.0, 1.0])}, "round", "nll", "t")
    for path in (bar, line):
        assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        report.bar_plot(tmp_path / "bad.png", ["a"], [1.0, 2.0], "y", "t")


def test_emit_last_line_is_the_last_stdout_line():
    @click.command()
    def cmd() -> None:
        click.echo("human summary")
        report.emit_last_line({"speed": 1.5, "bad": math.inf, "ok": True})

    result = CliRunner().invoke(cmd, [])
    assert result.exit_code == 0
    assert json.loads(result.output.strip().splitlines()[-1]) == {"speed": 1.5, "bad": None, "ok": True}
