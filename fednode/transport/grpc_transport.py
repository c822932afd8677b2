"""The real transport: grpc.aio with mutual TLS, chunked streams, typed refusals.

The servicer is a thin layer over `fednode.transport.endpoint.PeerEndpoint` (admission, decoding
and counting, shared with the in-memory twin): each RPC method hands the endpoint the caller from
the TLS context and turns a `ProtocolError` into a gRPC status with the machine-readable reason
(and a revocation list, when the refusal carries one) in trailing metadata. Health checking is
served alongside, server reflection when asked ([mesh] reflection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fednode.errors import NetworkError, ProtocolError, Reason
from fednode.security import tls
from fednode.security.identity import NodeIdentity
from fednode.transport.base import (
    REASON_METADATA_KEY,
    Caller,
    CallGate,
    PeerCallError,
    PeerHandler,
    Transport,
    attached_revocation_list,
    status_code_for,
)
from fednode.transport.endpoint import INTERNAL_DETAIL, InternalFault, PeerEndpoint, Undecodable
from fednode.v1 import peer_pb2 as pb
from fednode.v1 import peer_pb2_grpc

log = logging.getLogger(__name__)

# A chunk is at most 16 MiB of plaintext (config bound) plus framing; nothing larger is accepted.
MAX_MESSAGE = 17 * 1024 * 1024
M = TypeVar("M", bound=Message)  # a request message type
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Peer"].full_name
REVOCATION_METADATA_KEY = "fednode-revocation-list-bin"
RETIRE_CHANNELS_AFTER_S = 90.0  # old client channels outlive a certificate reload this long (in-flight calls)


def _caller(context: grpc.aio.ServicerContext) -> Caller:
    """The TLS-authenticated caller. A certificate TLS accepted but we cannot read is b"" (never
    None, which means "no TLS" to the gate): the gate refuses it instead of waving it through."""
    return Caller(tls.peer_node_id(context), tls.peer_certificate_der(context) or b"")


async def _abort(context: grpc.aio.ServicerContext, exc: ProtocolError | InternalFault) -> NoReturn:
    """End the call with `exc` as its status: a refusal with its reason (and any revocation list)
    in trailing metadata, a handler fault as INTERNAL with the fixed text. Raises, as abort does."""
    if isinstance(exc, InternalFault):
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAIL)
        raise AssertionError("context.abort returned")
    code = getattr(grpc.StatusCode, status_code_for(exc.reason))
    metadata: list[tuple[str, str | bytes]] = [(REASON_METADATA_KEY, Reason.Name(exc.reason))]
    revocation_list = attached_revocation_list(exc)  # a revoked caller gets the (CA-signed) proof
    if revocation_list is not None:
        metadata.append((REVOCATION_METADATA_KEY, revocation_list))
    context.set_trailing_metadata(tuple(metadata))
    await context.abort(code, exc.detail)
    raise AssertionError("context.abort returned")


async def _drain(stream: AsyncIterator[object], max_chunks: int = 65_536, max_seconds: float = 3.0) -> None:
    """Read (and drop) a little of a refused client stream before answering: a status sent while
    the client is still writing can be lost to a stream reset, and the peer would then see an
    untyped error instead of the reason. Bounded, so a hostile endless stream costs us little."""
    async def consume() -> None:
        count = 0
        async for _ in stream:
            count += 1
            if count >= max_chunks:
                return

    with contextlib.suppress(Exception):
        await asyncio.wait_for(consume(), max_seconds)


def _lenient(message_type: type[M]) -> Callable[[bytes], M | Undecodable]:
    def parse(data: bytes) -> M | Undecodable:
        try:
            message: M = message_type.FromString(data)
            return message
        except DecodeError:
            return Undecodable(message_type.DESCRIPTOR.name, len(data))
    return parse


class PeerServicer(peer_pb2_grpc.PeerServicer):
    """gRPC's side of a `PeerEndpoint`: the caller from the TLS context in, a refusal out as a
    status with its reason (and any revocation list) in trailing metadata. Admission, decoding and
    counting are the endpoint's, the same for every RPC and every transport."""

    def __init__(self, endpoint: PeerEndpoint):
        self.endpoint = endpoint

    async def Handshake(self, request: pb.SignedHello | Undecodable,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> pb.SignedHello:
        try:
            return await self.endpoint.handshake(request, _caller(context))
        except (ProtocolError, InternalFault) as exc:
            await _abort(context, exc)

    async def Gossip(self, request: pb.Digest | Undecodable,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> pb.Digest:
        try:
            return await self.endpoint.gossip(request, _caller(context))
        except (ProtocolError, InternalFault) as exc:
            await _abort(context, exc)

    async def PushMessenger(self, request_iterator: AsyncIterator[pb.Chunk | Undecodable],  # noqa: N802,E501
                            context: grpc.aio.ServicerContext) -> pb.Receipt:
        try:
            return await self.endpoint.push(request_iterator, _caller(context))
        except (ProtocolError, InternalFault) as exc:
            if isinstance(exc, ProtocolError):
                await _drain(request_iterator)  # so the caller reads the reason, not a stream reset
            await _abort(context, exc)

    async def FetchState(self, request: pb.StateRequest | Undecodable,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        try:
            async for chunk in self.endpoint.fetch(request, _caller(context)):
                yield chunk
        except (ProtocolError, InternalFault) as exc:
            await _abort(context, exc)


def add_peer_servicer(servicer: PeerServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_PeerServicer_to_server, with lenient request deserializers."""
    handlers = {
        "Handshake": grpc.unary_unary_rpc_method_handler(
            servicer.Handshake, request_deserializer=_lenient(pb.SignedHello),
            response_serializer=pb.SignedHello.SerializeToString),
        "Gossip": grpc.unary_unary_rpc_method_handler(
            servicer.Gossip, request_deserializer=_lenient(pb.Digest), response_serializer=pb.Digest.SerializeToString),
        "PushMessenger": grpc.stream_unary_rpc_method_handler(
            servicer.PushMessenger, request_deserializer=_lenient(pb.Chunk),
            response_serializer=pb.Receipt.SerializeToString),
        "FetchState": grpc.unary_stream_rpc_method_handler(
            servicer.FetchState, request_deserializer=_lenient(pb.StateRequest),
            response_serializer=pb.Chunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _call_error(address: str, exc: grpc.aio.AioRpcError) -> PeerCallError:
    reason = Reason.REASON_UNSPECIFIED
    revocation_list = None
    for key, value in exc.trailing_metadata() or ():
        if key == REASON_METADATA_KEY and value in Reason.keys():
            reason = Reason.Value(value)
        elif key == REVOCATION_METADATA_KEY and isinstance(value, bytes):
            revocation_list = value
    return PeerCallError(address, exc.code().name, reason, exc.details() or "", revocation_list=revocation_list)


class GrpcTransport(Transport):
    """Client and server halves over one identity. Channels are cached per address."""

    def __init__(self, identity: NodeIdentity, *, reflection: bool = False):
        self.identity = identity
        self.reflection = reflection  # off by default: it tells any member which services we run
        self._credentials = tls.channel_credentials(identity)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._retired: set[grpc.aio.Channel] = set()
        self._retire_tasks: set[asyncio.Task[None]] = set()
        self._server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()

    async def serve(self, handler: PeerHandler, listen: str, gate: CallGate) -> str:
        server = grpc.aio.server(options=[*tls.server_options(MAX_MESSAGE), ("grpc.so_reuseport", 0)])
        add_peer_servicer(PeerServicer(PeerEndpoint(handler, gate)), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.reflection:
            reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        try:
            # new TLS handshakes ask for self.identity afresh: set_identity() swaps the certificate
            # without closing the listener or the connections already open
            port = server.add_secure_port(listen, tls.rotating_server_credentials(lambda: self.identity))
        except RuntimeError as exc:
            raise NetworkError(f"cannot listen on {listen} ({exc}): is the port in use or the address "
                               f"not local? change [node] listen") from None
        if port == 0:
            raise NetworkError(f"cannot listen on {listen}: the port is in use or the address is not local; "
                               f"change [node] listen")
        await server.start()
        self._server = server
        await self._set_serving(True)
        host = listen.rpartition(":")[0]
        return f"{host}:{port}"

    def set_identity(self, identity: NodeIdentity) -> None:
        """Use a reloaded certificate: the server presents it from the next TLS handshake on, and
        calls go over new channels that present it. Channels of the old identity are closed after
        RETIRE_CHANNELS_AFTER_S, so calls in flight on them finish."""
        credentials = tls.channel_credentials(identity)  # raises PkiError (expired) before anything changes
        self.identity = identity
        self._credentials = credentials
        old, self._channels = list(self._channels.values()), {}
        if old:
            self._retired.update(old)
            task = asyncio.get_running_loop().create_task(self._close_later(old, RETIRE_CHANNELS_AFTER_S))
            self._retire_tasks.add(task)
            task.add_done_callback(self._retire_tasks.discard)

    def forget(self, address: str) -> None:
        """Drop the cached channel to `address`: while that peer was down the channel's reconnect
        backoff grew (up to `max_reconnect_backoff_ms`), and a peer that just (re)joined would
        otherwise stay unreachable for that long. Calls in flight on it finish."""
        channel = self._channels.pop(address, None)
        if channel is None:
            return
        self._retired.add(channel)
        try:
            task = asyncio.get_running_loop().create_task(self._close_later([channel], RETIRE_CHANNELS_AFTER_S))
        except RuntimeError:  # no loop running (a synchronous caller): closed with the transport
            return
        self._retire_tasks.add(task)
        task.add_done_callback(self._retire_tasks.discard)

    async def _close_later(self, channels: list[grpc.aio.Channel], delay: float) -> None:
        await asyncio.sleep(delay)
        for channel in channels:
            self._retired.discard(channel)
            with contextlib.suppress(Exception):
                await channel.close()

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            result = self.health.set(name, status)
            if hasattr(result, "__await__"):
                await result

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.secure_channel(address, self._credentials,
                                              options=tls.channel_options(MAX_MESSAGE))
            self._channels[address] = channel
        return channel

    def _stub(self, address: str) -> peer_pb2_grpc.PeerStub:
        return peer_pb2_grpc.PeerStub(self._channel(address))  # type: ignore[no-untyped-call]  # generated

    async def handshake(self, address: str, hello: pb.SignedHello, timeout: float) -> pb.SignedHello:
        try:
            reply: pb.SignedHello = await self._stub(address).Handshake(hello, timeout=timeout)
            return reply
        except grpc.aio.AioRpcError as exc:
            raise _call_error(address, exc) from None

    async def gossip(self, address: str, digest: pb.Digest, timeout: float) -> pb.Digest:
        try:
            answer: pb.Digest = await self._stub(address).Gossip(digest, timeout=timeout)
            return answer
        except grpc.aio.AioRpcError as exc:
            raise _call_error(address, exc) from None

    async def push(self, address: str, chunks: AsyncIterator[pb.Chunk], timeout: float) -> pb.Receipt:
        try:
            receipt: pb.Receipt = await self._stub(address).PushMessenger(chunks, timeout=timeout)
            return receipt
        except grpc.aio.AioRpcError as exc:
            raise _call_error(address, exc) from None

    async def fetch(self, address: str, request: pb.StateRequest, timeout: float) -> AsyncIterator[pb.Chunk]:
        call = self._stub(address).FetchState(request, timeout=timeout)
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise _call_error(address, exc) from None
        finally:
            call.cancel()

    async def close(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._set_serving(False)
            await self._server.stop(grace)
            self._server = None
        for task in list(self._retire_tasks):
            task.cancel()
        for channel in [*self._channels.values(), *self._retired]:
            await channel.close()
        self._channels.clear()
        self._retired.clear()
