"""N real `fednode run` processes on loopback, driven from tests and benchmarks, with fault hooks.

Every fault acts on real processes and the real mTLS gRPC path: kill -9 and SIGSTOP are signals;
partitions, latency, stalls and tampering are plans the daemons read through `FEDNODE_FAULTS`
(see fednode/transport/faults.py). Use it as a context manager: every process it started is
stopped on exit, on Ctrl-C, on SIGTERM, and (through PR_SET_PDEATHSIG) even if the harness
itself is killed.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from fednode.launcher import LocalMesh
from fednode.store.atomic import write_atomic
from fednode.transport.faults import ENV_VAR, FaultPlan
from fednode.v1 import operator_pb2 as opb
from tools.harness.collect import NodeReport, ResourceSample, read_rounds

Status = dict[str, Any]


class HarnessError(RuntimeError):
    """The mesh did not reach a condition in time (the message carries the nodes' log tails)."""


class ProcessHarness:
    def __init__(self, workdir: Path, n: int, *, overrides: dict[str, dict[str, Any]] | None = None,
                 seed: int = 0, code_bytes: int = 400_000, progress: Callable[[str], None] | None = None):
        if n < 1:
            raise ValueError(f"a mesh needs at least one node, got n={n}")
        self.workdir = Path(workdir)
        self.mesh = LocalMesh.create(self.workdir, n, code_bytes=code_bytes, overrides=overrides, seed=seed)
        self.plans = {node.name: FaultPlan() for node in self.mesh.nodes}
        self.paused: set[str] = set()
        self.up: set[str] = set()  # started and not deliberately killed/stopped: a death here is a failure
        self.samples: dict[str, list[tuple[int, ResourceSample]]] = {node.name: [] for node in self.mesh.nodes}
        self.progress = progress or (lambda _msg: None)
        self._old_sigterm: Any = None
        for name in self.names:
            self._write_plan(name)

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.mesh.nodes]

    def address(self, name: str) -> str:
        return self.mesh.node(name).address

    def data_dir(self, name: str) -> Path:
        return self.mesh.node(name).data_dir

    def __enter__(self) -> ProcessHarness:
        with contextlib.suppress(ValueError):  # only the main thread may install handlers
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        if self._old_sigterm is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, self._old_sigterm)

    def start(self, names: Iterable[str] | None = None) -> None:
        """Start daemons (all by default); the shared tokenizer is built once first."""
        self.mesh.prepare_tokenizer()
        for name in names or self.names:
            self.mesh.start(name, env={ENV_VAR: str(self._plan_path(name))})
            self.up.add(name)

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Resume paused daemons (a stopped process cannot drain), stop all, and check that no
        process is left. Returns exit codes."""
        for name in list(self.paused):
            self.resume(name)
        codes = self.mesh.stop_all(timeout=timeout)
        leaked = [name for name in self.names if self.alive(name)]
        if leaked:
            raise HarnessError(f"daemons still running after stop: {leaked}")
        return codes

    def alive(self, name: str) -> bool:
        proc = self.mesh.procs.get(name)
        return proc is not None and proc.poll() is None

    def pid(self, name: str) -> int:
        return self.mesh.procs[name].pid

    # ---- faults --------------------------------------------------------------------------------

    def kill(self, name: str) -> None:
        """kill -9 the daemon (no drain, no atexit: a crash)."""
        self.paused.discard(name)
        self.up.discard(name)
        self.mesh.kill(name)

    def restart(self, name: str) -> None:
        """Start a killed or stopped daemon again on the same config, data and port."""
        if self.alive(name):
            raise HarnessError(f"{name} is still running: kill or stop it before restarting")
        self.mesh.start(name, env={ENV_VAR: str(self._plan_path(name))})
        self.up.add(name)

    def stop(self, name: str, timeout: float = 30.0) -> int:
        """SIGTERM (drain) and wait; the exit code."""
        self.resume(name)
        self.up.discard(name)
        return self.mesh.stop(name, timeout)

    def pause(self, name: str) -> None:
        self.mesh.signal(name, signal.SIGSTOP)
        self.paused.add(name)

    def resume(self, name: str) -> None:
        if name in self.paused:
            self.mesh.signal(name, signal.SIGCONT)
            self.paused.discard(name)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between different groups (both directions); nodes not named keep all links."""
        groups = [list(g) for g in groups]
        group_of = {name: i for i, g in enumerate(groups) for name in g}
        for name in self.names:
            if name not in group_of:
                continue
            cut = {self.address(other) for other, g in group_of.items() if g != group_of[name]}
            self._set(name, block=frozenset(cut))

    def heal(self) -> None:
        for name in self.names:
            self._set(name, block=frozenset())

    def block_fetch(self, name: str, donors: Iterable[str]) -> None:
        """This node's FetchState calls to `donors` (node names) fail UNAVAILABLE; gossip and pushes
        still flow. An empty list lifts it."""
        self._set(name, block_fetch=frozenset(self.address(d) for d in donors))

    def set_latency(self, ms: float, names: Iterable[str] | None = None) -> None:
        """Delay every outgoing call (and pushed chunk) of these nodes by `ms`."""
        for name in names or self.names:
            self._set(name, latency_ms=float(ms))

    def stall(self, name: str, after_chunks: int | None) -> None:
        """This node's pushes stop after `after_chunks` chunks and hang until their deadline."""
        self._set(name, stall_after=after_chunks)

    def tamper(self, name: str, on: bool = True) -> None:
        """This node flips a ciphertext bit in every chunk it pushes (peers must refuse: TAMPERED)."""
        self._set(name, tamper=on)

    def crash_at(self, name: str, *points: str) -> None:
        """The daemon SIGKILLs itself the next time it reaches one of these store write points
        (e.g. "atomic.written", "atomic.fsynced", "journal.round_inserted"); none clears. Waits
        stop watching it while the crash is armed, since its death is expected."""
        self._set(name, crash_at=frozenset(points))
        if points:
            self.up.discard(name)

    def _set(self, name: str, **changes: Any) -> None:
        plan = self.plans[name]
        self.plans[name] = FaultPlan(**{**plan.__dict__, **changes})
        self._write_plan(name)

    def _plan_path(self, name: str) -> Path:
        return self.mesh.node(name).home / "faults.json"

    def _write_plan(self, name: str) -> None:
        write_atomic(self._plan_path(name), self.plans[name].to_json().encode())

    # ---- observing -----------------------------------------------------------------------------

    def status(self, name: str) -> Status | None:
        """The node's operator Status with 64-bit counters as ints (JSON mapping makes them strings);
        None while it is down or paused."""
        status = self.mesh.status(name) if self.alive(name) and name not in self.paused else None
        return typed_status(status) if status is not None else None

    def rounds(self, name: str):
        return read_rounds(self.data_dir(name))

    def sample(self, name: str) -> ResourceSample:
        return ResourceSample.of(self.pid(name))

    def wait_until(self, what: str, predicate: Callable[[dict[str, Status]], bool], timeout: float,
                   names: Iterable[str] | None = None, poll: float = 0.25) -> dict[str, Status]:
        """Poll the statuses of `names` (default: every node started and not killed, stopped or
        paused) until `predicate` holds; a daemon that died or the timeout raises HarnessError
        with the log tails."""
        deadline = time.monotonic() + timeout
        watched = list(names) if names is not None else None
        while True:
            current = watched or [n for n in self.names if n in self.up and n not in self.paused]
            for name in current:
                proc = self.mesh.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise HarnessError(f"{name} exited with {proc.returncode} while waiting for {what}:\n"
                                       f"{self.mesh.log_tail(name)}")
            statuses = {name: self.status(name) for name in current}
            if all(s is not None for s in statuses.values()) and predicate(statuses):  # type: ignore[arg-type]
                return statuses  # type: ignore[return-value]
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {n}: {statuses.get(n)}\n{self.mesh.log_tail(n, 8)}" for n in current)
                raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
            time.sleep(poll)

    def wait_members(self, timeout: float = 60.0, names: Iterable[str] | None = None) -> dict[str, Status]:
        """Every watched node sees all the other watched nodes alive."""
        names = list(names or self.names)
        return self.wait_until("membership", lambda st: all(s["peers_alive"] >= len(names) - 1 for s in st.values()),
                               timeout, names)

    def wait_round(self, round_: int, timeout: float, names: Iterable[str] | None = None) -> dict[str, Status]:
        """Every watched node has committed `round_`; samples resources as rounds pass."""
        def reached(statuses: dict[str, Status]) -> bool:
            for name, s in statuses.items():
                trail = self.samples[name]
                if not trail or trail[-1][0] != s["round"]:
                    with contextlib.suppress(Exception):  # the process may be exiting
                        trail.append((int(s["round"]), self.sample(name)))
            return all(int(s["round"]) >= round_ for s in statuses.values())

        self.progress(f"waiting for round {round_}")
        return self.wait_until(f"round {round_}", reached, timeout, names)

    def report(self, name: str) -> NodeReport:
        return NodeReport(name, self.status(name), self.rounds(name), list(self.samples[name]))

    def ports_free(self, within: float = 60.0) -> bool:
        """True once none of the mesh's listen ports is held any more (after close), polling up to
        `within` seconds: the kernel may keep a killed daemon's connections briefly."""
        deadline = time.monotonic() + within
        while not all(port_bindable(self.address(name)) for name in self.names):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True


def port_bindable(address: str) -> bool:
    """Whether a new server could listen on HOST:PORT now (SO_REUSEADDR, as a daemon binds: a
    connection in TIME_WAIT is no owner)."""
    host, _, port = address.rpartition(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def typed_status(status: Status) -> Status:
    out = dict(status)
    for field in opb.StatusReply.DESCRIPTOR.fields:
        if field.name in out and field.cpp_type in _INT_TYPES:
            out[field.name] = int(out[field.name])
    return out


_INT_TYPES = {FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64, FieldDescriptor.CPPTYPE_INT32,
              FieldDescriptor.CPPTYPE_UINT32}


def _raise_system_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)

