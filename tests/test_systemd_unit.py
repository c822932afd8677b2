"""The systemd template unit, sysusers.d and tmpfiles.d files: checked by systemd's own tools.

`systemd-analyze verify` exits 0 even when it warns, so stderr must be empty too. Nothing here is
applied to this host: sysusers and tmpfiles only ever run against a throw-away --root.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fednode.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
UNIT = SYSTEMD / "fednode@.service"
SYSUSERS = SYSTEMD / "fednode.sysusers.conf"
TMPFILES = SYSTEMD / "fednode.tmpfiles.conf"
INSTALLED_FEDNODE = "/opt/fednode/venv/bin/fednode"  # where deploy/systemd/README.md installs it
# measured 1.1 with systemd 252; fail if a change makes the unit noticeably weaker
MAX_EXPOSURE = 1.5
DRAIN_BOUND_S = 30.0  # fednode.node.daemon.DRAIN_BOUND_S (checked below without importing torch)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (it ships with systemd): the unit is checked where it is")
    return path


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Key -> values across sections (systemd allows repeated keys); comments dropped."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key)
    assert values and len(values) == 1, f"{key}= must be set exactly once in {UNIT.name}"
    return values[0]


@pytest.fixture
def instance(tmp_path: Path) -> Path:
    """fednode@test.service: the template instantiated, ExecStart pointing at an executable that
    exists here (the venv's fednode); every other line unchanged."""
    fednode = Path(sys.executable).with_name("fednode")
    if not fednode.exists():
        fednode = Path(shutil.which("fednode") or "")
    if not fednode.is_file():
        pytest.skip("the fednode console script is not installed next to this Python: pip install -e .")
    lines = UNIT.read_text().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith(f"ExecStart={INSTALLED_FEDNODE} ")]
    assert len(starts) == 1, f"ExecStart must run {INSTALLED_FEDNODE}, once"
    lines[starts[0]] = lines[starts[0]].replace(INSTALLED_FEDNODE, str(fednode), 1)
    path = tmp_path / "fednode@test.service"
    path.write_text("".join(lines))
    return path


def test_systemd_analyze_verify_is_silent(instance: Path):
    analyze = _tool("systemd-analyze")
    result = subprocess.run([analyze, "verify", str(instance)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""})
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"systemd-analyze verify warned:\n{result.stderr}"


def test_security_exposure_stays_low(instance: Path):
    analyze = _tool("systemd-analyze")
    result = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(instance)],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0"})
    if result.returncode != 0 and "offline" in result.stderr.lower() and "unrecognized" in result.stderr.lower():
        pytest.skip(f"this systemd-analyze has no --offline (needs systemd 250+): {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) (\S+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} {match.group(2)} > {MAX_EXPOSURE}:\n{result.stdout}"


def test_unit_settings_match_the_daemon():
    settings = _unit_settings(UNIT.read_text())
    assert _one(settings, "Type") == "notify"
    assert _one(settings, "NotifyAccess") == "main"
    assert _one(settings, "Restart") == "on-failure"
    assert _one(settings, "ExecStart") == f"{INSTALLED_FEDNODE} run --config /etc/fednode/%i.toml"
    assert _one(settings, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert _one(settings, "StateDirectory") == "fednode/%i"
    assert _one(settings, "RuntimeDirectory") == "fednode/%i"
    assert _one(settings, "User") == "fednode"
    assert _one(settings, "NoNewPrivileges") == "yes"
    assert _one(settings, "ProtectSystem") == "strict"
    assert _one(settings, "CapabilityBoundingSet") == ""
    assert "@system-service" in settings["SystemCallFilter"]
    # the drain bound plus goodbye and shutdown must fit before systemd's SIGKILL
    daemon_source = (ROOT / "fednode" / "node" / "daemon.py").read_text()
    assert re.search(rf"^DRAIN_BOUND_S = {DRAIN_BOUND_S}\b", daemon_source, re.M), "drain bound changed: fix the unit"
    assert int(_one(settings, "TimeoutStopSec")) >= DRAIN_BOUND_S + 10
    watchdog = int(_one(settings, "WatchdogSec"))
    assert 10 <= watchdog <= 300
    no_restart = {int(code) for code in _one(settings, "RestartPreventExitStatus").split()}
    assert no_restart == {ExitCode.USAGE, ExitCode.CONFIG, ExitCode.PKI, ExitCode.STORE}


def _passwd_entry(root: Path, user: str) -> list[str] | None:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields
    return None


def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path):
    """Applied with --root to an empty directory tree only, never to this host."""
    sysusers = _tool("systemd-sysusers")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    result = subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"systemd-sysusers --root needs root here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "fednode" in result.stderr and "warn" not in result.stderr.lower()  # it reports what it created
    entry = _passwd_entry(root, "fednode")
    assert entry is not None, "sysusers did not create the fednode user"
    assert entry[5] == "/var/lib/fednode" and entry[6] == "/usr/sbin/nologin"
    assert int(entry[2]) < 1000, "fednode must be a system user"
    gid = int(entry[3])

    tmpfiles = _tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles --create changes ownership, which needs root (even under --root)")
    result = subprocess.run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    for directory in ("etc/fednode", "etc/fednode/pki"):
        st = (root / directory).stat()
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 0, gid), directory
