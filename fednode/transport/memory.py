"""In-process twin of the gRPC transport, for simulating large meshes in one process.

Same semantics as `GrpcTransport` (tests/test_transport_contract.py runs one suite over both):
the same `PeerEndpoint` serves the handler, messages are serialized and parsed on every hop (so no
object is shared between nodes), refusals come back as `PeerCallError` with the same reason,
status code and revocation list, streams are pulled one chunk at a time, and faults (down nodes, partitions,
latency) look to the caller like the network's UNAVAILABLE / DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from google.protobuf.message import Message

from fednode.errors import ProtocolError, Reason
from fednode.transport.base import (
    Caller,
    CallGate,
    PeerCallError,
    PeerHandler,
    Transport,
    refusal_error,
)
from fednode.transport.endpoint import INTERNAL_DETAIL, InternalFault, PeerEndpoint
from fednode.v1 import peer_pb2 as pb

T = TypeVar("T", bound=Message)  # every hop carries a protobuf message


@dataclass
class MemoryNetwork:
    """The shared medium: who listens where, and which links are cut or slow."""

    handlers: dict[str, PeerEndpoint] = field(default_factory=dict)  # address -> the handler served there
    cut: set[frozenset[str]] = field(default_factory=set)  # pairs of addresses that cannot talk
    latency_s: dict[str, float] = field(default_factory=dict)  # added to every call to/from an address
    bytes_moved: int = 0
    _next_port: int = 1

    def allocate(self) -> str:
        self._next_port += 1
        return f"mem:{self._next_port}"

    def partition(self, group_a: list[str], group_b: list[str]) -> None:
        self.cut.update(frozenset((a, b)) for a in group_a for b in group_b)

    def heal(self) -> None:
        self.cut.clear()

    def reachable(self, src: str, dst: str) -> bool:
        return dst in self.handlers and frozenset((src, dst)) not in self.cut


def _copy(msg: T) -> T:
    clone: T = type(msg)()
    clone.ParseFromString(msg.SerializeToString())
    return clone


class MemoryTransport(Transport):
    def __init__(self, network: MemoryNetwork, node_id: str):
        self.network = network
        self.node_id = node_id
        self.address = ""

    async def serve(self, handler: PeerHandler, listen: str, gate: CallGate) -> str:
        address = listen if listen and not listen.endswith(":0") else self.network.allocate()
        self.network.handlers[address] = PeerEndpoint(handler, gate)
        self.address = address
        return address

    async def close(self, grace: float = 1.0) -> None:
        self.network.handlers.pop(self.address, None)

    def _caller(self) -> Caller:
        return Caller(self.node_id)  # no TLS: the twin's caller is who it says (its node name)

    def _target(self, address: str) -> PeerEndpoint:
        if not self.network.reachable(self.address, address):
            raise PeerCallError(address, "UNAVAILABLE", Reason.REASON_UNSPECIFIED, "no route to peer")
        return self.network.handlers[address]

    def _latency(self, address: str) -> float:
        return self.network.latency_s.get(address, 0.0) + self.network.latency_s.get(self.address, 0.0)

    async def _unary(self, address: str, call: Callable[[], Awaitable[T]], timeout: float) -> T:
        async def delayed() -> T:  # latency counts against the deadline, as on a real network
            delay = self._latency(address)
            if delay:
                await asyncio.sleep(delay)
            return await call()

        try:
            return _copy(await asyncio.wait_for(delayed(), timeout))
        except ProtocolError as exc:
            raise refusal_error(address, exc) from None
        except TimeoutError:
            raise PeerCallError(address, "DEADLINE_EXCEEDED", Reason.REASON_UNSPECIFIED, "deadline exceeded") from None
        except InternalFault:
            raise PeerCallError(address, "INTERNAL", Reason.REASON_UNSPECIFIED, INTERNAL_DETAIL) from None

    async def handshake(self, address: str, hello: pb.SignedHello, timeout: float) -> pb.SignedHello:
        endpoint = self._target(address)
        return await self._unary(address, lambda: endpoint.handshake(_copy(hello), self._caller()), timeout)

    async def gossip(self, address: str, digest: pb.Digest, timeout: float) -> pb.Digest:
        endpoint = self._target(address)
        return await self._unary(address, lambda: endpoint.gossip(_copy(digest), self._caller()), timeout)

    async def push(self, address: str, chunks: AsyncIterator[pb.Chunk], timeout: float) -> pb.Receipt:
        endpoint = self._target(address)
        network, src = self.network, self.address

        async def wire() -> AsyncIterator[pb.Chunk]:
            async for chunk in chunks:
                if not network.reachable(src, address):
                    raise PeerCallError(address, "UNAVAILABLE", Reason.REASON_UNSPECIFIED, "link cut mid-stream")
                network.bytes_moved += len(chunk.data)
                yield _copy(chunk)

        return await self._unary(address, lambda: endpoint.push(wire(), self._caller()), timeout)

    async def fetch(self, address: str, request: pb.StateRequest, timeout: float) -> AsyncIterator[pb.Chunk]:
        endpoint = self._target(address)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = self._latency(address)
        if delay >= timeout:
            await asyncio.sleep(timeout)
            raise PeerCallError(address, "DEADLINE_EXCEEDED", Reason.REASON_UNSPECIFIED, "deadline exceeded")
        if delay:
            await asyncio.sleep(delay)
        stream = endpoint.fetch(_copy(request), self._caller())
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                if not self.network.reachable(self.address, address):
                    raise PeerCallError(address, "UNAVAILABLE", Reason.REASON_UNSPECIFIED, "link cut mid-stream")
                try:
                    chunk = await asyncio.wait_for(anext(stream), remaining)
                except StopAsyncIteration:
                    return
                self.network.bytes_moved += len(chunk.data)
                yield _copy(chunk)
        except ProtocolError as exc:
            raise refusal_error(address, exc) from None
        except TimeoutError:
            raise PeerCallError(address, "DEADLINE_EXCEEDED", Reason.REASON_UNSPECIFIED, "deadline exceeded") from None
        except InternalFault:
            raise PeerCallError(address, "INTERNAL", Reason.REASON_UNSPECIFIED, INTERNAL_DETAIL) from None
        finally:
            await stream.aclose()
