"""The launcher's daemons die with it (even when it is SIGKILLed) without a Popen preexec_fn: a
preexec_fn made Python run gRPC's fork handlers in a launcher with live channels, and the child
aborted on a closed epoll fd before exec (a restarted daemon exited -6 in a full test run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fednode.launcher import PARENT_ENV

CHILD = ("import sys, time; from fednode.launcher import die_with_launcher; die_with_launcher(); "
         "open(sys.argv[1], 'w').write('armed'); time.sleep(120)")


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: PID 1 in a container may never reap it)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_a_daemon_started_by_the_launcher_dies_with_it(tmp_path):
    pid_file, armed = tmp_path / "child.pid", tmp_path / "armed"
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys, time
        env = {{**os.environ, {PARENT_ENV!r}: str(os.getpid())}}
        child = subprocess.Popen([sys.executable, "-c", {CHILD!r}, {str(armed)!r}], env=env, start_new_session=True)
        open({str(pid_file)!r}, "w").write(str(child.pid))
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", launcher])
    deadline = time.monotonic() + 60
    while not (armed.exists() and pid_file.exists()) and time.monotonic() < deadline:  # death signal set
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _gone(child):
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its launcher")
