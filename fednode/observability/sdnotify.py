"""systemd service notifications (sd_notify) spoken directly over the notify socket.

The protocol (systemd's sd_notify(3), "notify socket"): the service manager puts the address of an
AF_UNIX datagram socket in $NOTIFY_SOCKET (a path, or "@name" for the abstract namespace); the
service sends newline-separated KEY=VALUE assignments, one message per datagram. Outside systemd
the variable is unset and every call here is a cheap no-op, so the daemon calls these
unconditionally.

What fednode sends:

- ``READY=1`` once the node really serves (peer port bound, operator socket up), with a STATUS line;
  systemd holds ``systemctl start`` and every unit ordered after ours until then;
- ``STATUS=...`` lines with the phase, round, level and live peers (``status_loop``; ``systemctl
  status`` shows the latest);
- ``WATCHDOG=1`` from the event loop (``watchdog_loop``) at half the unit's ``WatchdogSec=``, only
  while a heartbeat says the loop is healthy: a hung loop stops pinging and systemd restarts it;
- ``STOPPING=1`` when a drain starts; ``RELOADING=1`` (then ``READY=1``) around a config reload.

Sending never raises: a failure is logged once (a dead notify socket must not take the node down).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 0.5  # never block the event loop for long on a full socket queue


def _socket_address(value: str) -> str | bytes | None:
    """The sockaddr for $NOTIFY_SOCKET: '@name' is the abstract namespace (a leading NUL byte);
    only absolute paths are accepted otherwise, as sd_notify does."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # relative paths, vsock:... and junk: unsupported here


def watchdog_timeout(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd set for *this* process, in seconds, or None when disabled.

    sd_watchdog_enabled(3) semantics: $WATCHDOG_USEC must be a positive integer; if $WATCHDOG_PID is
    set it must be our pid (the variables leaked into a child are not addressed to the child)."""
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", raw_usec)
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            wanted = int(raw_pid)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a pid", raw_pid)
            return None
        if wanted != (os.getpid() if pid is None else pid):
            return None
    return usec / 1_000_000


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """How often to send WATCHDOG=1: half the timeout (as sd_watchdog_enabled(3) recommends), or
    None when no watchdog is configured for this process."""
    timeout = watchdog_timeout(environ, pid)
    return None if timeout is None else timeout / 2


def _clean(text: str) -> str:
    """One line: a newline in a status would let its text inject other assignments (READY=1...)."""
    return " ".join(str(text).split())


def status_line(phase: str, round: int, level: int, peers_alive: int, peers_known: int | None = None) -> str:
    """The STATUS= text fednode shows in `systemctl status`, e.g.
    'training, round 12, level 2, 2/3 peers alive'."""
    peers = f"{peers_alive}/{peers_known}" if peers_known is not None else str(peers_alive)
    return f"{phase}, round {round}, level {level}, {peers} peers alive"


class Notifier:
    """Sends sd_notify messages to one notify socket; a no-op when there is none.

    `Notifier.from_env()` reads $NOTIFY_SOCKET (and, with `unset_environment=True`, removes it and the
    watchdog variables so child processes do not talk to systemd in our name)."""

    def __init__(self, address: str | None):
        self.address = address or None
        self._sockaddr = _socket_address(address) if address else None
        if address and self._sockaddr is None:
            log.warning("ignoring NOTIFY_SOCKET=%r: only absolute paths and @abstract names are supported",
                        address)
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, unset_environment: bool = False) -> Notifier:
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET"))
        if unset_environment and environ is None:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        return self._sockaddr is not None

    def notify(self, *assignments: str) -> bool:
        """Send assignments ("KEY=VALUE") as one datagram. True when sent; False when disabled or the
        send failed (logged at warning the first time, at debug after that)."""
        if self._sockaddr is None or not assignments:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec (PEP 446)
                sock.settimeout(SEND_TIMEOUT_S)
                self._sock = sock
            self._sock.sendto(message, self._sockaddr)
        except OSError as exc:
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            log.log(level, "cannot notify systemd at %s (%s): service status and watchdog pings are lost; "
                    "check NOTIFY_SOCKET and NotifyAccess= in the unit", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: start-up finished and the node serves (optionally with a STATUS line)."""
        return self.notify("READY=1", *([f"STATUS={_clean(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: a drain started (systemd then waits up to TimeoutStopSec for the exit)."""
        return self.notify("STOPPING=1", *([f"STATUS={_clean(status)}"] if status else []))

    def reloading(self) -> bool:
        """RELOADING=1 at the start of a config reload; send ready() when it is done. MONOTONIC_USEC
        is included as Type=notify-reload (systemd 253+) requires; older systemd ignores it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: ask for more time for a long start-up or stop step."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Heartbeat:
    """A liveness signal for `watchdog_loop`: parts of the node call `beat()` when they make progress;
    calling the object answers whether the last beat is younger than `max_age` seconds."""

    def __init__(self, max_age: float, clock: Callable[[], float] = time.monotonic):
        self.max_age = max_age
        self.clock = clock
        self.last = clock()

    def beat(self) -> None:
        self.last = self.clock()

    def __call__(self) -> bool:
        return self.clock() - self.last <= self.max_age


async def watchdog_loop(notifier: Notifier, interval: float | None, heartbeat: Callable[[], bool]) -> None:
    """Send WATCHDOG=1 every `interval` seconds while `heartbeat()` is true; run it as a task on the
    daemon's event loop (cancel it at shutdown).

    A blocked event loop cannot run this coroutine, so pings stop and systemd restarts the service
    after WatchdogSec. `heartbeat()` adds what the loop itself cannot see (e.g. the gossip task has
    not ticked for a while): while it is false (or raises), no ping is sent; pings resume if it
    recovers before the watchdog fires. Returns at once when there is no watchdog or no socket."""
    if interval is None or interval <= 0 or not notifier.enabled:
        return
    unhealthy = False
    while True:
        try:
            healthy = bool(heartbeat())
        except Exception:  # a broken heartbeat must not look healthy, nor kill the loop
            if not unhealthy:
                log.exception("watchdog heartbeat check failed: withholding the ping")
            healthy = False
        if healthy:
            if unhealthy:
                log.info("heartbeat recovered: watchdog pings resumed")
                unhealthy = False
            notifier.watchdog()
        elif not unhealthy:
            unhealthy = True
            log.error("heartbeat stale: withholding watchdog pings, systemd will restart the node unless it "
                      "recovers within WatchdogSec")
        await asyncio.sleep(interval)


async def status_loop(notifier: Notifier, text: Callable[[], str], interval: float = 5.0) -> None:
    """Send STATUS=text() every `interval` seconds when it changed (run it as a task next to
    `watchdog_loop`; cancel it at shutdown). Returns at once when there is no notify socket."""
    if not notifier.enabled:
        return
    last = None
    while True:
        try:
            current = text()
        except Exception:  # a status is cosmetic: never let it end the task
            log.debug("status text failed", exc_info=True)
            current = None
        if current is not None and current != last:
            notifier.status(current)
            last = current
        await asyncio.sleep(interval)
