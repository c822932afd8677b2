"""Lay out and launch a local mesh of real daemons: CA, certificates, configs, data, processes.

Used by `fednode demo`, the integration tests and the tools harness. Every process it starts
runs in its own session and is stopped (SIGTERM, then SIGKILL) by `LocalMesh.stop_all`, which
also runs at interpreter exit, so nothing is left behind even when the caller is interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.config import to_toml
from fednode.operator_client import fetch_status, wait_until


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


PARENT_ENV = "FEDNODE_LAUNCHER_PID"  # set for the daemons a LocalMesh starts: they die with it


def die_with_launcher() -> None:
    """In a daemon a LocalMesh started: get SIGKILL when the launching process dies, even by
    SIGKILL, so no daemon outlives an interrupted harness (Linux prctl PR_SET_PDEATHSIG; elsewhere
    atexit must do). Called by the daemon itself, not as a Popen preexec_fn: a preexec_fn makes
    Python fork (not vfork) and run gRPC's fork handlers in the launcher, whose poller thread then
    aborts the child on a closed epoll fd (grpc/grpc#43055: a restarted daemon died with -6)."""
    launcher = os.environ.pop(PARENT_ENV, "")
    if sys.platform != "linux" or not launcher.isdigit():
        return
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != int(launcher):  # the launcher died before the prctl took hold
        os._exit(1)


@dataclass
class NodeSpec:
    name: str
    address: str
    home: Path  # node directory: config, data dir, code, log

    @property
    def config_path(self) -> Path:
        return self.home / "fednode.toml"

    @property
    def data_dir(self) -> Path:
        return self.home / "state"

    @property
    def code_dir(self) -> Path:
        return self.home / "code"

    @property
    def socket(self) -> Path:
        return self.data_dir / "operator.sock"

    @property
    def log_path(self) -> Path:
        return self.home / "node.log"


@dataclass
class LocalMesh:
    workdir: Path
    nodes: list[NodeSpec]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @classmethod
    def create(cls, workdir: Path, n: int, *, base_port: int = 0, code_bytes: int = 400_000,
               overrides: dict[str, dict[str, Any]] | None = None, seed: int = 0) -> LocalMesh:
        """Make the CA, one certificate, config and non-IID code partition per node."""
        from fednode.learning.data import stdlib_partitions, write_partition
        from fednode.security.ca import init_ca, issue_node

        workdir = workdir.resolve()
        pki = workdir / "pki"
        init_ca(pki, force=True)
        ports = list(range(base_port, base_port + n)) if base_port else free_ports(n)
        nodes = [NodeSpec(f"node-{i}", f"127.0.0.1:{ports[i]}", workdir / f"node-{i}") for i in range(n)]
        partitions = stdlib_partitions(n, seed=seed)
        for i, node in enumerate(nodes):
            node.home.mkdir(parents=True, exist_ok=True)
            issue_node(pki, node.name, ["127.0.0.1", "localhost"])
            if not node.code_dir.exists():
                write_partition(partitions[i], node.code_dir, max_bytes=code_bytes)
            raw: dict[str, dict[str, Any]] = {
                "node": {"name": node.name, "data_dir": str(node.data_dir), "listen": node.address},
                "mesh": {"seeds": [m.address for m in nodes if m is not node], "gossip_interval_s": 0.5,
                         "suspect_after_s": 4.0, "dead_after_s": 10.0},
                "tls": {"ca": str(pki / "ca.crt"), "cert": str(pki / f"{node.name}.crt"),
                        "key": str(pki / f"{node.name}.key")},
                "model": {"preset": "tiny", "seed": seed, "tokenizer_cache": str(workdir / "cache" / "tokenizers"),
                          "cache": str(workdir / "cache" / "models")},
                "data": {"dir": str(node.code_dir)},
                "train": {"threads": 1, "round_timeout_s": 30.0},
                "log": {"format": "json"},
            }
            for section, values in (overrides or {}).items():
                raw.setdefault(section, {}).update(values)
            node.config_path.write_text(to_toml(raw))
        mesh = cls(workdir, nodes)
        atexit.register(mesh.stop_all)
        return mesh

    def configure(self, name: str, section: str, **values: Any) -> None:
        """Change one node's config before (re)starting it."""
        import tomllib

        path = self.node(name).config_path
        raw = tomllib.loads(path.read_text())
        raw.setdefault(section, {}).update(values)
        path.write_text(to_toml(raw))

    def prepare_tokenizer(self) -> None:
        """Build the shared tokenizer once, so N daemons do not all train it at start."""
        import tomllib

        from fednode.learning.tokenizer import build_tokenizer

        cfg = tomllib.loads(self.nodes[0].config_path.read_text())
        build_tokenizer(Path(cfg["model"]["tokenizer_cache"]), vocab_size=cfg["model"].get("vocab_size", 4096))

    def start(self, name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start (or restart) one daemon; `env` adds variables (e.g. FEDNODE_FAULTS)."""
        node = self.node(name)
        log = open(node.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", PARENT_ENV: str(os.getpid()),
               **(env or {})}
        proc = subprocess.Popen([sys.executable, "-m", "fednode", "run", "--config", str(node.config_path)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    @contextlib.contextmanager
    def running(self, names: list[str] | tuple[str, ...] | None = None, timeout: float = 120.0,
                min_round: int = 1) -> Iterator[LocalMesh]:
        """Start these daemons (all by default), wait until each sees the others alive and has
        committed `min_round`, and stop every daemon on exit (tests' module fixtures)."""
        names = list(names or [n.name for n in self.nodes])
        self.prepare_tokenizer()
        for name in names:
            self.start(name)
        try:
            for name in names:
                self.wait(name, lambda s: s["peers_alive"] == len(names) - 1 and int(s["round"]) >= min_round,
                          timeout)
            yield self
        finally:
            self.stop_all(timeout=20)

    def start_all(self) -> None:
        for node in self.nodes:
            self.start(node.name)

    def node(self, name: str) -> NodeSpec:
        return next(n for n in self.nodes if n.name == name)

    def status(self, name: str) -> dict | None:
        try:
            return fetch_status(self.node(name).socket, timeout=2.0)
        except Exception:  # noqa: BLE001 - not up (yet)
            return None

    def wait(self, name: str, predicate, timeout: float) -> dict:
        proc = self.procs.get(name)

        def check(status: dict) -> bool:
            return predicate(status)

        try:
            return wait_until(self.node(name).socket, check, timeout)
        except TimeoutError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; log tail:\n{self.log_tail(name)}") from None
            raise

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.node(name).log_path
        if not path.exists():
            return "(no log)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, name: str, sig: int) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def stop(self, name: str, timeout: float = 30.0, *, send_term: bool = True) -> int:
        """SIGTERM (drain), wait, then SIGKILL; returns the exit code.

        Only one SIGTERM is ever sent: a second one means "force exit" to the daemon."""
        proc = self.procs.get(name)
        if proc is None:
            return 0
        if send_term and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        return proc.returncode

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop_all(self, timeout: float = 30.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        codes = {}
        for name in list(self.procs):
            codes[name] = self.stop(name, timeout=max(0.1, deadline - time.monotonic()), send_term=False)
        return codes
