"""Test helpers for the transports: a recording PeerHandler, a recording CallGate, chunk streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fednode.errors import ProtocolError, Reason
from fednode.transport.base import Caller
from fednode.v1 import peer_pb2 as pb


class Recorder:
    """A real PeerHandler: answers from its own state and records what it was sent."""

    def __init__(self, name: str):
        self.name = name
        self.answer_hello = pb.SignedHello(body=name.encode(), signature=b"sig", certificate_der=b"cert")
        self.answer_digest = pb.Digest(sender_id=name, records=[pb.PeerRecord(heartbeat=7)])
        self.hellos: list[tuple[pb.SignedHello, Caller]] = []
        self.digests: list[tuple[pb.Digest, Caller]] = []
        self.pushes: list[tuple[pb.EnvelopeStart, list[pb.Chunk], Caller]] = []
        self.fetches: list[tuple[pb.StateRequest, Caller]] = []
        self.state: list[bytes] = [b"alpha", b"beta", b"gamma!"]
        self.refuse: int | None = None  # refuse every call with this reason (a push after its first chunk)
        self.refusal_list: bytes | None = None  # the revocation list such a refusal carries
        self.stall = asyncio.Event()  # while `stalled`, unary handlers wait on this (never set unless a test does)
        self.stalled = False
        self.fetch_stall_after: int | None = None  # a fetch hangs before serving this chunk index
        self.fetch_refuse_after: int | None = None  # a fetch is refused (NO_STATE) before this chunk index
        self.sent_chunks: list[pb.Chunk] = []
        self.crash = False  # every handler raises an unexpected (non-protocol) error: a bug in the node

    def _maybe_crash(self) -> None:
        if self.crash:
            raise RuntimeError("handler bug")

    def _refusal(self, detail: str) -> ProtocolError:
        assert self.refuse is not None
        return ProtocolError(self.refuse, detail, revocation_list=self.refusal_list)

    async def _maybe_stall(self) -> None:
        if self.stalled:
            await self.stall.wait()

    async def handle_handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello:
        await self._maybe_stall()
        self._maybe_crash()
        if self.refuse is not None:
            raise self._refusal(f"{self.name} refuses")
        self.hellos.append((hello, caller))
        return self.answer_hello

    async def handle_gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest:
        await self._maybe_stall()
        self._maybe_crash()
        if self.refuse is not None:
            raise self._refusal(f"{self.name} refuses")
        self.digests.append((digest, caller))
        return self.answer_digest

    async def handle_push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk],
                          caller: Caller) -> pb.Receipt:
        got: list[pb.Chunk] = []
        async for chunk in chunks:
            self._maybe_crash()
            if self.refuse is not None and len(got) == 1:
                raise self._refusal("refused mid-stream")
            got.append(chunk)
        self.pushes.append((start, got, caller))
        return pb.Receipt(accepted=True, bytes_received=sum(len(c.data) for c in got))

    async def handle_fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]:
        self.fetches.append((request, caller))
        self._maybe_crash()
        if self.refuse is not None:
            raise self._refusal("no state here")
        for i in range(request.from_chunk, len(self.state)):
            if self.fetch_stall_after is not None and i >= self.fetch_stall_after:
                await self.stall.wait()
            if self.fetch_refuse_after is not None and i >= self.fetch_refuse_after:
                raise ProtocolError(Reason.NO_STATE, "state withdrawn mid-stream")
            chunk = pb.Chunk(index=i, data=self.state[i], last=i == len(self.state) - 1)
            self.sent_chunks.append(chunk)
            yield chunk


class RecordingGate:
    """A CallGate that records what it admitted and every refusal; `refuse` refuses every caller."""

    def __init__(self) -> None:
        self.admitted: list[Caller] = []
        self.refusals: list[tuple[int, Caller]] = []
        self.refuse: ProtocolError | None = None

    def admit(self, caller: Caller) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.admitted.append(caller)

    def refused(self, exc: ProtocolError, caller: Caller) -> None:
        self.refusals.append((exc.reason, caller))


async def stream(chunks: list[pb.Chunk], hook=None) -> AsyncIterator[pb.Chunk]:
    for i, chunk in enumerate(chunks):
        if hook is not None:
            hook(i)
        yield chunk


def push_chunks(n: int) -> list[pb.Chunk]:
    """An envelope start, then `n` data chunks of 1, 2, ... n bytes."""
    start = pb.EnvelopeStart(header=b"hdr", signature=b"s", sender_certificate_der=b"c")
    return [pb.Chunk(start=start)] + [pb.Chunk(index=i, data=bytes([i]) * (i + 1), last=i == n - 1)
                                      for i in range(n)]
