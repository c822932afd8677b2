"""`fednode check`: a real preflight over real certificates, files and ports; one line per finding
and the exit code `fednode run` would exit with."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path

from click.testing import CliRunner

from fednode.cli import main
from fednode.config import load_config, to_toml
from fednode.errors import ExitCode
from fednode.learning.data import stdlib_partitions, write_partition
from fednode.preflight import Level, check_port, check_tls, exit_code, run_checks
from fednode.security.ca import init_ca, issue_node


def _site(root: Path, *, cert_for: str = "site-a", **sections) -> Path:
    init_ca(root / "pki")
    files = issue_node(root / "pki", cert_for, ["127.0.0.1"])
    code = root / "code"
    if not code.exists():
        write_partition(stdlib_partitions(2)[0], code, max_bytes=5_000)
    raw = {"node": {"name": "site-a", "data_dir": str(root / "state"), "listen": "127.0.0.1:0"},
           "tls": {"ca": str(files.ca_path), "cert": str(files.cert_path), "key": str(files.key_path)},
           "model": {"preset": "micro"}, "data": {"dir": str(code)}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = root / "site-a.toml"
    path.write_text(to_toml(raw))
    return path


def test_a_ready_site_passes_every_check_with_one_line_each(tmp_path):
    path = _site(tmp_path)
    result = CliRunner().invoke(main, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    subjects = [line.split(":")[0].split()[-1] for line in lines[:-1]]
    assert subjects == ["tls", "crl", "data", "model", "state", "listen", "operator"]
    assert all(line.startswith("ok ") for line in lines[:-1]), lines
    assert "files," in lines[2] and "expires in 365 days" in lines[0]
    assert lines[-1] == "site-a: 0 failed, 0 warnings, 7 ok"
    assert not (tmp_path / "state").exists()  # checking writes nothing


def test_each_problem_is_one_line_with_the_fix_and_the_run_exit_code(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        path = _site(tmp_path, cert_for="site-b", data={"dir": str(tmp_path / "nope")},
                     metrics={"listen": f"127.0.0.1:{port}"})
        findings = run_checks(load_config(path))
    failed = {f.subject: f for f in findings if f.level is Level.FAIL}
    assert set(failed) == {"tls", "data", "metrics"}, [f.line() for f in findings]
    assert "is for 'site-b'" in failed["tls"].message and 'set name = "site-b"' in failed["tls"].message
    assert "does not exist" in failed["data"].message
    assert "cannot listen" in failed["metrics"].message and failed["metrics"].exit_code is ExitCode.NETWORK
    assert exit_code(findings) is ExitCode.CONFIG  # the first failure's, as `fednode run` would exit


def test_an_empty_data_dir_a_missing_key_and_a_busy_port(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blob.py").write_bytes(b"\x00\x01")  # matches *.py, but binary
    path = _site(tmp_path, data={"dir": str(empty)})
    cfg = load_config(path)
    [data] = [f for f in run_checks(cfg) if f.subject == "data"]
    assert data.level is Level.FAIL and "no file to train on" in data.message and "1 binary" in data.message
    Path(cfg.tls.key).unlink()
    tls = check_tls(cfg)
    assert tls.level is Level.FAIL and tls.exit_code is ExitCode.PKI and str(cfg.tls.key) in tls.message
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        assert check_port("listen", taken, "change [node] listen").level is Level.FAIL
    assert check_port("listen", "127.0.0.1:0", "x").level is Level.OK


def test_a_certificate_close_to_expiry_is_a_warning_not_a_failure(tmp_path):
    cfg = load_config(_site(tmp_path))
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=350)
    finding = check_tls(cfg, now=soon)
    assert finding.level is Level.WARN and "fednode ca issue" in finding.message
    assert exit_code([finding]) is ExitCode.OK
