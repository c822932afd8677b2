"""Fault injection for tests and benchmarks: a transport wrapper driven by a JSON file.

The harness (tools/harness) writes one small JSON plan per node and the daemon, started with
`FEDNODE_FAULTS=<path>`, wraps its real transport in `FaultyTransport`, which re-reads the plan
whenever the file changes. Faults act on the node's *outgoing* calls, so a partition is two
symmetric plans (each side blocks the other's addresses) and the real gRPC/mTLS path stays
underneath. Without the environment variable nothing here is loaded: a production daemon never
carries a fault hook it did not ask for.

Plan keys (all optional):
  block            list of peer addresses every outgoing call to fails with UNAVAILABLE
  block_fetch      list of peer addresses whose FetchState fails with UNAVAILABLE (gossip and
                   pushes still flow: a donor that cannot serve its state)
  latency_ms       delay added before every outgoing call (and every pushed chunk)
  stall_after      a push stream stops sending after this many chunks and hangs until its deadline
  tamper           flip one bit in the ciphertext of every pushed chunk (a tampering peer)
  crash_at         store write points (fednode.store.atomic.CRASH_POINTS, e.g. "atomic.fsynced",
                   "journal.round_inserted") at which the daemon SIGKILLs itself: power loss mid-write
                   (installed with fednode.store.atomic.set_crash_hook)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from fednode.errors import ConfigError, Reason
from fednode.security.identity import NodeIdentity
from fednode.store import atomic
from fednode.transport.base import CallGate, PeerCallError, PeerHandler, Transport
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)

ENV_VAR = "FEDNODE_FAULTS"
_KEYS = {"block", "block_fetch", "latency_ms", "stall_after", "tamper", "crash_at"}


@dataclass(frozen=True)
class FaultPlan:
    block: frozenset[str] = frozenset()
    latency_ms: float = 0.0
    stall_after: int | None = None
    tamper: bool = False
    crash_at: frozenset[str] = frozenset()
    block_fetch: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, text: str, source: str = "fault plan") -> FaultPlan:
        """Parse and validate a plan; ConfigError names the bad key and what it must be."""
        try:
            raw = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not JSON ({exc.msg} at line {exc.lineno}): rewrite it") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must be a JSON object of {sorted(_KEYS)}")
        unknown = set(raw) - _KEYS
        if unknown:
            raise ConfigError(f"{source} has unknown keys {sorted(unknown)}: use only {sorted(_KEYS)}")
        block = raw.get("block", [])
        if not isinstance(block, list) or not all(isinstance(a, str) for a in block):
            raise ConfigError(f"{source}: block must be a list of peer addresses")
        block_fetch = raw.get("block_fetch", [])
        if not isinstance(block_fetch, list) or not all(isinstance(a, str) for a in block_fetch):
            raise ConfigError(f"{source}: block_fetch must be a list of peer addresses")
        latency = raw.get("latency_ms", 0)
        if not isinstance(latency, int | float) or isinstance(latency, bool) or not 0 <= latency <= 600_000:
            raise ConfigError(f"{source}: latency_ms must be a number of milliseconds in [0, 600000]")
        stall = raw.get("stall_after")
        if stall is not None and (not isinstance(stall, int) or isinstance(stall, bool) or stall < 0):
            raise ConfigError(f"{source}: stall_after must be a chunk count >= 0 or null")
        tamper = raw.get("tamper", False)
        if not isinstance(tamper, bool):
            raise ConfigError(f"{source}: tamper must be true or false")
        crash_at = raw.get("crash_at", [])
        if not isinstance(crash_at, list) or not all(isinstance(a, str) for a in crash_at):
            raise ConfigError(f"{source}: crash_at must be a list of crash point names")
        unknown_points = sorted(set(crash_at) - set(atomic.CRASH_POINTS))
        if unknown_points:
            raise ConfigError(f"{source}: crash_at names unknown points {unknown_points}: use only "
                              f"{list(atomic.CRASH_POINTS)}")
        return cls(frozenset(block), float(latency), stall, tamper, frozenset(crash_at), frozenset(block_fetch))

    def to_json(self) -> str:
        return json.dumps({"block": sorted(self.block), "block_fetch": sorted(self.block_fetch),
                           "latency_ms": self.latency_ms,
                           "stall_after": self.stall_after, "tamper": self.tamper,
                           "crash_at": sorted(self.crash_at)})

    def blocks(self, address: str) -> bool:
        return address in self.block


def tampered(chunk: pb.Chunk) -> pb.Chunk:
    """The same chunk with one ciphertext bit flipped (the envelope must refuse it as TAMPERED)."""
    if not chunk.data:
        return chunk
    out = pb.Chunk()
    out.CopyFrom(chunk)
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 0x01
    out.data = bytes(data)
    return out


class PlanFile:
    """The plan at `path`, re-read when its mtime or size changes; a bad file keeps the last plan."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._plan = FaultPlan()

    def current(self) -> FaultPlan:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._plan = None, FaultPlan()
            return self._plan
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                plan = FaultPlan.from_json(self.path.read_text(), f"fault plan {self.path}")
            except (ConfigError, OSError) as exc:
                log.error("fault plan ignored: %s", exc)
                return self._plan
            self._stamp, self._plan = stamp, plan
            log.warning("fault plan now %s", plan.to_json())
        return self._plan


class FaultyTransport(Transport):
    """Delegates the whole `Transport` interface to a real transport (`inner`), applying the current
    plan to outgoing calls; serving, identity reloads and `forget` pass through untouched. Nothing
    else is forwarded: whatever is not the interface is the inner transport's (`.inner`)."""

    def __init__(self, inner: Transport, plan: Callable[[], FaultPlan]):
        self.inner = inner
        self.plan = plan

    def set_identity(self, identity: NodeIdentity) -> None:
        self.inner.set_identity(identity)

    def forget(self, address: str) -> None:
        self.inner.forget(address)

    async def _before(self, address: str) -> FaultPlan:
        plan = self.plan()
        if plan.latency_ms:
            await asyncio.sleep(plan.latency_ms / 1000)
        if plan.blocks(address):
            raise PeerCallError(address, "UNAVAILABLE", Reason.REASON_UNSPECIFIED, "link cut by the fault plan")
        return plan

    async def serve(self, handler: PeerHandler, listen: str, gate: CallGate) -> str:
        return await self.inner.serve(handler, listen, gate)

    async def handshake(self, address: str, hello: pb.SignedHello, timeout: float) -> pb.SignedHello:
        await self._before(address)
        return await self.inner.handshake(address, hello, timeout)

    async def gossip(self, address: str, digest: pb.Digest, timeout: float) -> pb.Digest:
        await self._before(address)
        return await self.inner.gossip(address, digest, timeout)

    async def push(self, address: str, chunks: AsyncIterator[pb.Chunk], timeout: float) -> pb.Receipt:
        plan = await self._before(address)

        async def faulty() -> AsyncIterator[pb.Chunk]:
            sent = 0
            async for chunk in chunks:
                if plan.stall_after is not None and sent >= plan.stall_after:
                    await asyncio.sleep(timeout + 1)  # a stalled peer: the stream's deadline ends it
                if plan.latency_ms and sent:
                    await asyncio.sleep(plan.latency_ms / 1000)
                yield tampered(chunk) if plan.tamper else chunk
                sent += 1

        return await self.inner.push(address, faulty(), timeout)

    async def fetch(self, address: str, request: pb.StateRequest, timeout: float) -> AsyncIterator[pb.Chunk]:
        plan = await self._before(address)
        if address in plan.block_fetch:
            raise PeerCallError(address, "UNAVAILABLE", Reason.REASON_UNSPECIFIED, "state fetch cut by the fault plan")
        async for chunk in self.inner.fetch(address, request, timeout):
            yield chunk

    async def close(self, grace: float = 1.0) -> None:
        await self.inner.close(grace)


def _crash_if_planned(plan: FaultPlan, point: str) -> None:
    if point in plan.crash_at:
        log.warning("fault plan: crashing at %s", point)
        os.kill(os.getpid(), signal.SIGKILL)


def wrap_from_env(factory: Callable[[NodeIdentity], Transport],
                  environ: dict[str, str] | None = None) -> Callable[[NodeIdentity], Transport]:
    """`factory` unchanged unless FEDNODE_FAULTS names a plan file; then a wrapping factory."""
    path = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    if not path:
        return factory
    plan_file = PlanFile(Path(path))
    log.warning("fault injection enabled from %s=%s (tests and benchmarks only)", ENV_VAR, path)
    atomic.set_crash_hook(lambda point: _crash_if_planned(plan_file.current(), point))
    return lambda identity: FaultyTransport(factory(identity), plan_file.current)
