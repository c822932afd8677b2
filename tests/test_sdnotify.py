"""sd_notify over a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from fednode.observability import sdnotify
from fednode.observability.sdnotify import Heartbeat, Notifier, status_line, watchdog_interval, watchdog_loop


class FakeSystemd:
    """The receiving end of NOTIFY_SOCKET: a bound datagram socket we can read messages from."""

    def __init__(self, sock: socket.socket, env_value: str):
        self.sock = sock
        self.env_value = env_value

    def messages(self, wait: float = 0.0) -> list[bytes]:
        """Every datagram queued now (waiting up to `wait` s for the first one)."""
        out = []
        if wait > 0:
            self.sock.settimeout(wait)
            try:
                out.append(self.sock.recv(4096))
            except TimeoutError:
                return out
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture
def path_socket() -> Iterator[FakeSystemd]:
    # a short directory: AF_UNIX paths are limited to ~108 bytes and pytest's tmp_path can be long
    directory = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield FakeSystemd(sock, path)
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def abstract_socket() -> Iterator[FakeSystemd]:
    name = f"fednode-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    try:
        yield FakeSystemd(sock, "@" + name)
    finally:
        sock.close()


# ------------------------------------------------------------------------------------ messages


def test_exact_messages_on_a_path_socket(path_socket: FakeSystemd):
    n = Notifier.from_env({"NOTIFY_SOCKET": path_socket.env_value})
    assert n.enabled
    assert n.ready("training, round 0, level 0, 0/0 peers alive")
    assert n.status("collecting, round 3, level 1, 2/2 peers alive")
    assert n.watchdog()
    assert n.stopping()
    assert n.stopping("draining, round 3")
    assert n.extend_timeout(2.5)
    assert path_socket.messages(wait=1.0) == [
        b"READY=1\nSTATUS=training, round 0, level 0, 0/0 peers alive",
        b"STATUS=collecting, round 3, level 1, 2/2 peers alive",
        b"WATCHDOG=1",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=draining, round 3",
        b"EXTEND_TIMEOUT_USEC=2500000",
    ]
    n.close()


def test_ready_without_status_is_one_assignment(path_socket: FakeSystemd):
    assert Notifier(path_socket.env_value).ready()
    assert path_socket.messages(wait=1.0) == [b"READY=1"]


def test_abstract_namespace_address(abstract_socket: FakeSystemd):
    n = Notifier.from_env({"NOTIFY_SOCKET": abstract_socket.env_value})
    assert n.enabled
    assert n.ready("up")
    assert n.watchdog()
    assert abstract_socket.messages(wait=1.0) == [b"READY=1\nSTATUS=up", b"WATCHDOG=1"]


def test_status_text_cannot_inject_assignments(path_socket: FakeSystemd):
    n = Notifier(path_socket.env_value)
    n.status("evil\nREADY=1\r\nWATCHDOG=1")
    assert path_socket.messages(wait=1.0) == [b"STATUS=evil READY=1 WATCHDOG=1"]


def test_reloading_carries_monotonic_usec(path_socket: FakeSystemd):
    n = Notifier(path_socket.env_value)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    (message,) = path_socket.messages(wait=1.0)
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", message)
    assert match and int(match.group(1)) >= before


def test_no_notify_socket_is_a_silent_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False
    assert n.stopping() is False and n.reloading() is False
    assert n._sock is None  # nothing was even opened
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


def test_unsupported_address_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger=sdnotify.__name__):
        n = Notifier("relative/notify")
    assert not n.enabled and not n.ready()
    assert "NOTIFY_SOCKET" in caplog.text


def test_send_errors_are_logged_once_and_never_raised(caplog):
    missing = os.path.join(tempfile.gettempdir(), f"no-such-notify-{secrets.token_hex(6)}")
    n = Notifier(missing)
    with caplog.at_level(logging.DEBUG, logger=sdnotify.__name__):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("x") is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()


def test_unset_environment_hides_the_socket_from_children(monkeypatch, path_socket: FakeSystemd):
    monkeypatch.setenv("NOTIFY_SOCKET", path_socket.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(unset_environment=True)
    assert n.enabled and n.ready()
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert "WATCHDOG_PID" not in os.environ
    assert path_socket.messages(wait=1.0) == [b"READY=1"]


def test_status_line_format():
    assert status_line("training", 12, 2, 2, 3) == "training, round 12, level 2, 2/3 peers alive"
    assert status_line("collecting", 0, 0, 1) == "collecting, round 0, level 0, 1 peers alive"


# ---------------------------------------------------------------------------------- watchdog env


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "10000000"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "<self>"}, 5.0),
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "<other>"}, None),  # meant for our parent/child
    ({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "junk"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "ten"}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "500"}, 0.00025),
])
def test_watchdog_interval_follows_sd_watchdog_enabled(env, expected):
    env = {k: str(os.getpid()) if v == "<self>" else str(os.getpid() + 1) if v == "<other>" else v
           for k, v in env.items()}
    assert watchdog_interval(env) == expected
    if expected is not None:
        assert sdnotify.watchdog_timeout(env) == expected * 2


def test_watchdog_interval_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 15.0
    assert watchdog_interval(pid=os.getpid()) == 15.0


def test_heartbeat_ages_with_its_clock():
    now = [100.0]
    hb = Heartbeat(max_age=5.0, clock=lambda: now[0])
    assert hb()
    now[0] = 105.0
    assert hb()
    now[0] = 105.1
    assert not hb()
    hb.beat()
    assert hb()


# ---------------------------------------------------------------------------------- watchdog loop


def test_watchdog_loop_pings_while_healthy_and_stops_when_heartbeat_fails(path_socket: FakeSystemd):
    healthy = [True]

    async def scenario() -> tuple[int, int, int]:
        task = asyncio.create_task(watchdog_loop(Notifier(path_socket.env_value), 0.02, lambda: healthy[0]))
        await asyncio.sleep(0.2)
        pinged = path_socket.messages()
        healthy[0] = False
        await asyncio.sleep(0.05)  # at most one ping was already on its way when the flag flipped
        path_socket.messages()
        await asyncio.sleep(0.2)
        while_unhealthy = path_socket.messages()
        healthy[0] = True
        await asyncio.sleep(0.2)
        resumed = path_socket.messages()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert set(pinged) == {b"WATCHDOG=1"}
        return len(pinged), len(while_unhealthy), len(resumed)

    pinged, while_unhealthy, resumed = asyncio.run(scenario())
    assert pinged >= 3
    assert while_unhealthy == 0
    assert resumed >= 3


def test_watchdog_loop_treats_a_raising_heartbeat_as_unhealthy(path_socket: FakeSystemd, caplog):
    def broken() -> bool:
        raise RuntimeError("boom")

    async def scenario() -> None:
        task = asyncio.create_task(watchdog_loop(Notifier(path_socket.env_value), 0.01, broken))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with caplog.at_level(logging.ERROR, logger=sdnotify.__name__):
        asyncio.run(scenario())
    assert path_socket.messages() == []
    assert sum("heartbeat check failed" in r.getMessage() for r in caplog.records) == 1


def test_a_blocked_event_loop_sends_no_pings(path_socket: FakeSystemd):
    """The point of pinging from the loop: while the loop is stuck, systemd hears nothing."""

    async def scenario() -> int:
        task = asyncio.create_task(watchdog_loop(Notifier(path_socket.env_value), 0.02, lambda: True))
        await asyncio.sleep(0.1)
        assert path_socket.messages()
        time.sleep(0.3)  # a hung loop: fifteen intervals pass without the loop running
        during = len(path_socket.messages())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return during

    assert asyncio.run(scenario()) == 0


@pytest.mark.parametrize("interval", [None, 0.0])
def test_watchdog_loop_returns_at_once_without_a_watchdog(path_socket: FakeSystemd, interval):
    asyncio.run(asyncio.wait_for(watchdog_loop(Notifier(path_socket.env_value), interval, lambda: True), 1.0))
    assert path_socket.messages() == []


def test_watchdog_loop_returns_at_once_without_a_notify_socket():
    asyncio.run(asyncio.wait_for(watchdog_loop(Notifier(None), 0.01, lambda: True), 1.0))



def test_status_loop_sends_only_changes(path_socket: FakeSystemd):
    texts = iter(["training, round 1", "training, round 1", "boom", "collecting, round 1"])

    def text() -> str:
        value = next(texts, "collecting, round 1")
        if value == "boom":
            raise RuntimeError("status source failed")
        return value

    async def scenario() -> None:
        task = asyncio.create_task(sdnotify.status_loop(Notifier(path_socket.env_value), text, 0.01))
        await asyncio.sleep(0.15)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert path_socket.messages() == [b"STATUS=training, round 1", b"STATUS=collecting, round 1"]


def test_status_loop_returns_at_once_without_a_notify_socket():
    asyncio.run(asyncio.wait_for(sdnotify.status_loop(Notifier(None), lambda: "x", 0.01), 1.0))
