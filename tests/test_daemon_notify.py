"""A real daemon under a fake systemd notify socket: READY only once serving, STOPPING on SIGTERM."""

from __future__ import annotations

import socket
import time

from fednode.launcher import LocalMesh


def _read(sock: socket.socket, want: str, timeout: float) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            seen += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            break
        if want in seen:
            return seen
    raise AssertionError(f"{want} not received; got {seen}")


def test_daemon_notifies_ready_then_stopping(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    mesh = LocalMesh.create(tmp_path / "mesh", 1, code_bytes=30_000,
                            overrides={"model": {"preset": "micro"}, "data": {"seq_len": 32, "max_tokens": 4000},
                                       "train": {"steps_per_round": 1, "batch_size": 2}})
    try:
        mesh.start("node-0")
        lines = _read(sock, "READY=1", 120)
        status = mesh.status("node-0")  # READY means the operator socket already answers
        assert status is not None and status["node_id"] == "node-0"
        assert any(line.startswith("STATUS=") for line in lines)
        assert mesh.stop("node-0") == 0
        assert "STOPPING=1" in _read(sock, "STOPPING=1", 30)
    finally:
        mesh.stop_all(timeout=10)
        sock.close()
