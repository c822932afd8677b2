"""What a process and the machine use: RSS now and at its peak (`PeakRss`), CPU seconds, the machine's
busy time and load average, and the machine and library versions the result records."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import threading
import time
from pathlib import Path
from typing import Any

from tools.bench_transport.common import SAMPLE_INTERVAL_S

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil  # not Linux: psutil knows how

        return int(psutil.Process().memory_info().rss)


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            found = re.search(rb"VmHWM:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """RSS just before a window and its peak during it: a sampler thread every few ms, and the
    kernel's exact high-water mark where it can be reset (so short spikes are not missed)."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.interval = interval
        self.before = 0
        self._peak = 0
        self._hwm_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.before = rss_bytes()
        self._peak = self.before
        self._hwm_ok = _reset_hwm()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def stop(self) -> tuple[int, int]:
        """(RSS before, peak RSS during) in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        peak = max(self._peak, rss_bytes())
        if self._hwm_ok:
            peak = max(peak, _hwm_bytes() or 0)
        return self.before, peak


def cpu_seconds() -> float:
    """CPU time of this whole process (all threads, user + system)."""
    return time.process_time()


def system_busy_seconds() -> float | None:
    """CPU time all processes of the machine used so far (Linux), to tell how much of a transfer's
    window other work took: the machine's busy time minus the sender's and receiver's own."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import cryptography
    import grpc
    import torch
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    openssl = ""
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl.backend import backend

        openssl = backend.openssl_version_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__, "cryptography": cryptography.__version__,
            "openssl": openssl, "protobuf": f"{protobuf_version} ({api_implementation.Type()})",
            "torch": torch.__version__}
