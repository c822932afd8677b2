"""The server side every transport shares: a `PeerHandler` behind a `CallGate`, one adapter for all
four RPCs.

A transport authenticates the caller and moves bytes; `PeerEndpoint` does the rest, once for every
RPC, unary and streaming alike: the gate admits the caller before the handler runs, a request that
did not decode is refused as MALFORMED, a push must open with its envelope start, and every
refusal the call ends in (the gate's, the endpoint's, the handler's) is reported to the gate once
and raised as the `ProtocolError` the transport sends back (gRPC: a status with the reason in
trailing metadata; the in-memory twin: the caller's `PeerCallError`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from fednode.errors import ProtocolError, Reason
from fednode.transport.base import Caller, CallGate, PeerCallError, PeerHandler
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)

# What a caller is told when the handler fails unexpectedly (a bug, not a refusal): a fixed text, so
# no exception message or internal detail crosses to a peer; the traceback is in this node's log.
INTERNAL_DETAIL = "internal error in the peer's handler (its log has the traceback)"

M = TypeVar("M", bound=Message)
R = TypeVar("R")


class InternalFault(Exception):
    """The handler failed unexpectedly; transports answer INTERNAL with `INTERNAL_DETAIL`."""


@dataclass(frozen=True)
class Undecodable:
    """A request that did not parse as its message type. A transport that decodes bytes (gRPC's
    lenient deserializers) hands it on, and the endpoint refuses it as MALFORMED, typed and counted,
    instead of gRPC's untyped UNKNOWN."""

    type_name: str
    size: int

    def refusal(self) -> ProtocolError:
        return ProtocolError(Reason.MALFORMED, f"a {self.size}-byte request is not a valid {self.type_name}: "
                                               f"send a serialized fednode.v1.{self.type_name}")


def decoded(request: M | Undecodable) -> M:
    if isinstance(request, Undecodable):
        raise request.refusal()
    return request


async def _decoded_stream(stream: AsyncIterator[pb.Chunk | Undecodable]) -> AsyncIterator[pb.Chunk]:
    async for chunk in stream:
        yield decoded(chunk)


class PeerEndpoint:
    """`handler` as served to a caller the transport authenticated (`Caller`)."""

    def __init__(self, handler: PeerHandler, gate: CallGate):
        self.handler = handler
        self.gate = gate

    async def _counted(self, call: Awaitable[R], caller: Caller) -> R:
        try:
            return await call
        except ProtocolError as exc:
            self.gate.refused(exc, caller)
            raise
        except PeerCallError:  # the caller's own side of an in-process stream (the twin): not ours
            raise
        except Exception as exc:
            raise _internal(exc, caller) from None

    async def _handshake(self, request: pb.SignedHello | Undecodable, caller: Caller) -> pb.SignedHello:
        self.gate.admit(caller)
        return await self.handler.handle_handshake(decoded(request), caller)

    async def handshake(self, request: pb.SignedHello | Undecodable, caller: Caller) -> pb.SignedHello:
        return await self._counted(self._handshake(request, caller), caller)

    async def _gossip(self, request: pb.Digest | Undecodable, caller: Caller) -> pb.Digest:
        self.gate.admit(caller)
        return await self.handler.handle_gossip(decoded(request), caller)

    async def gossip(self, request: pb.Digest | Undecodable, caller: Caller) -> pb.Digest:
        return await self._counted(self._gossip(request, caller), caller)

    async def _push(self, chunks: AsyncIterator[pb.Chunk | Undecodable], caller: Caller) -> pb.Receipt:
        self.gate.admit(caller)
        stream = _decoded_stream(chunks)
        try:
            first = await anext(stream)
        except StopAsyncIteration:
            raise ProtocolError(Reason.MALFORMED,
                                "empty stream: the first chunk must carry the envelope start") from None
        if not first.HasField("start"):
            raise ProtocolError(Reason.MALFORMED, "the first chunk must carry the envelope start")
        return await self.handler.handle_push(first.start, stream, caller)

    async def push(self, chunks: AsyncIterator[pb.Chunk | Undecodable], caller: Caller) -> pb.Receipt:
        """The whole push: the first chunk opens it (envelope start), the handler reads the rest."""
        return await self._counted(self._push(chunks, caller), caller)

    async def fetch(self, request: pb.StateRequest | Undecodable,
                    caller: Caller) -> AsyncGenerator[pb.Chunk, None]:
        """The handler's state stream, chunk by chunk; closing this closes the handler's stream."""
        try:
            self.gate.admit(caller)
            stream = self.handler.handle_fetch(decoded(request), caller)
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                if isinstance(stream, AsyncGenerator):
                    with contextlib.suppress(Exception):
                        await stream.aclose()
        except ProtocolError as exc:
            self.gate.refused(exc, caller)
            raise
        except PeerCallError:
            raise
        except Exception as exc:
            raise _internal(exc, caller) from None


def _internal(exc: Exception, caller: Caller) -> InternalFault:
    log.error("unexpected error serving %s: %s: %s", caller.node_id or "?", type(exc).__name__, exc, exc_info=exc)
    return InternalFault()
