"""The transport interface: what a node needs from the network, in both directions.

Two implementations share these semantics: `GrpcTransport` (real mTLS gRPC) and
`MemoryTransport` (an in-process twin for simulating large meshes); `FaultyTransport` wraps either.
A node only ever talks to this interface, so the same round logic runs over any of them, and
tests/test_transport_contract.py runs one suite over all three. On the server side each serves its
handler through the same `fednode.transport.endpoint.PeerEndpoint`, behind a `CallGate`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from fednode.errors import FednodeError, ProtocolError, Reason, reason_name
from fednode.v1 import peer_pb2 as pb

if TYPE_CHECKING:
    from fednode.security.identity import NodeIdentity

REASON_METADATA_KEY = "fednode-reason"
MAX_ATTACHED_REVOCATION_LIST = 4096  # bytes: well under gRPC's 8 KiB metadata limit


@dataclass(frozen=True)
class Caller:
    """Who is calling, as authenticated by the transport (TLS certificate CN for gRPC)."""

    node_id: str | None
    certificate_der: bytes | None = None


class PeerCallError(FednodeError):
    """A call to a peer failed: `reason` is the peer's typed refusal, or REASON_UNSPECIFIED
    when the failure was the network's (then `code` says what, e.g. UNAVAILABLE).
    `revocation_list` is the list a refusal carried (`ProtocolError.revocation_list`), as received:
    unverified, the node checks it against the mesh CA before adopting it."""

    def __init__(self, address: str, code: str, reason: int, detail: str, *,
                 revocation_list: bytes | None = None):
        what = reason_name(reason) if reason else code
        super().__init__(f"call to {address} failed: {what}: {detail}")
        self.address = address
        self.code = code
        self.reason = reason
        self.detail = detail
        self.revocation_list: bytes | None = revocation_list

    @property
    def unreachable(self) -> bool:
        return self.reason == Reason.REASON_UNSPECIFIED and self.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


class PeerHandler(Protocol):
    """The server side of the peer service, implemented by the node. Raise
    `fednode.errors.ProtocolError` to refuse with a typed reason. The transport serves it through
    `fednode.transport.endpoint.PeerEndpoint`, behind a `CallGate`."""

    async def handle_handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello: ...

    async def handle_gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest: ...

    async def handle_push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk],
                          caller: Caller) -> pb.Receipt: ...

    def handle_fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]: ...


class CallGate(Protocol):
    """What a server runs around every call, whatever the RPC (an interceptor's job): `admit` once
    before the handler (raise `ProtocolError` to refuse the caller, e.g. a revoked certificate),
    `refused` once for every refusal a call ends in (the gate's, the transport's own, such as an
    undecodable request, and the handler's), so every transport counts refusals the same way."""

    def admit(self, caller: Caller) -> None: ...

    def refused(self, exc: ProtocolError, caller: Caller) -> None: ...


class OpenGate:
    """Admits every caller the transport authenticated and counts nothing (tests, tools)."""

    def admit(self, caller: Caller) -> None:
        pass

    def refused(self, exc: ProtocolError, caller: Caller) -> None:
        pass


OPEN_GATE = OpenGate()


class Transport(abc.ABC):
    """Client calls to peers by address, plus serving a handler at a listen address."""

    @abc.abstractmethod
    async def serve(self, handler: PeerHandler, listen: str, gate: CallGate) -> str:
        """Start serving `handler` behind `gate` (required: a node passes its PeerGate, which checks the
        caller against the trust store; OPEN_GATE says in the code that a tool or test checks no one);
        returns the bound address (port 0 is resolved)."""

    @abc.abstractmethod
    async def handshake(self, address: str, hello: pb.SignedHello, timeout: float) -> pb.SignedHello: ...

    @abc.abstractmethod
    async def gossip(self, address: str, digest: pb.Digest, timeout: float) -> pb.Digest: ...

    @abc.abstractmethod
    async def push(self, address: str, chunks: AsyncIterator[pb.Chunk], timeout: float) -> pb.Receipt: ...

    @abc.abstractmethod
    def fetch(self, address: str, request: pb.StateRequest, timeout: float) -> AsyncIterator[pb.Chunk]: ...

    @abc.abstractmethod
    async def close(self, grace: float = 1.0) -> None: ...

    def set_identity(self, identity: NodeIdentity) -> None:  # noqa: B027 - a default, not a stub
        """Use a reloaded certificate from now on (new connections; open ones stay). Transports
        without TLS (the in-memory twin) have nothing to swap."""

    def forget(self, address: str) -> None:  # noqa: B027 - a default, not a stub
        """A peer (re)started at `address`: the next call dials it afresh instead of waiting out a
        reconnect backoff built up while it was down. Transports without connections: nothing."""


def attached_revocation_list(exc: ProtocolError) -> bytes | None:
    """The revocation list a refusal delivers to its caller: the refusal's own, unless it is over
    MAX_ATTACHED_REVOCATION_LIST (gRPC carries it in trailing metadata, limited to 8 KiB; a larger
    list still spreads by gossip). One rule, so every transport delivers the same."""
    if exc.revocation_list and len(exc.revocation_list) <= MAX_ATTACHED_REVOCATION_LIST:
        return bytes(exc.revocation_list)
    return None


def refusal_error(address: str, exc: ProtocolError) -> PeerCallError:
    """A peer's refusal as its caller sees it: the reason, its status code, the attached list."""
    return PeerCallError(address, status_code_for(exc.reason), exc.reason, exc.detail,
                         revocation_list=attached_revocation_list(exc))


def status_code_for(reason: int) -> str:
    """The gRPC status code name a refusal is sent with (one place, so both transports agree)."""
    return _REASON_CODES.get(reason, "INVALID_ARGUMENT")


_REASON_CODES: dict[int, str] = {
    Reason.PROTOCOL_MISMATCH: "FAILED_PRECONDITION",
    Reason.TOKENIZER_MISMATCH: "FAILED_PRECONDITION",
    Reason.FAMILY_MISMATCH: "FAILED_PRECONDITION",
    Reason.STALE_ROUND: "FAILED_PRECONDITION",
    Reason.BAD_CERTIFICATE: "UNAUTHENTICATED",
    Reason.BAD_SIGNATURE: "UNAUTHENTICATED",
    Reason.WRONG_RECIPIENT: "PERMISSION_DENIED",
    Reason.UNKNOWN_PEER: "PERMISSION_DENIED",
    Reason.REPLAY: "ALREADY_EXISTS",
    Reason.OVERSIZE: "RESOURCE_EXHAUSTED",
    Reason.RATE_LIMITED: "RESOURCE_EXHAUSTED",
    Reason.NOT_READY: "UNAVAILABLE",
    Reason.NO_STATE: "NOT_FOUND",
}
