"""In-memory transport twin: copy semantics, typed refusals, faults, latency, streams, deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from fednode.errors import ProtocolError, Reason
from fednode.transport.base import Caller, PeerCallError, status_code_for
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.v1 import peer_pb2 as pb


class Recorder:
    """A real PeerHandler: answers from its own state and records what it was sent."""

    def __init__(self, name: str):
        self.name = name
        self.answer_hello = pb.SignedHello(body=name.encode(), signature=b"sig", certificate_der=b"cert")
        self.answer_digest = pb.Digest(sender_id=name, records=[pb.PeerRecord(heartbeat=7)])
        self.hellos: list[tuple[pb.SignedHello, Caller]] = []
        self.digests: list[pb.Digest] = []
        self.pushes: list[tuple[pb.EnvelopeStart, list[pb.Chunk], Caller]] = []
        self.fetches: list[pb.StateRequest] = []
        self.state: list[bytes] = [b"alpha", b"beta", b"gamma!"]
        self.refuse: int | None = None  # raise ProtocolError(refuse) from every handler
        self.stall = asyncio.Event()  # while `stalled`, handlers wait on this (never set unless a test does)
        self.stalled = False
        self.fetch_stall_after: int | None = None
        self.sent_chunks: list[pb.Chunk] = []

    async def _maybe_stall(self) -> None:
        if self.stalled:
            await self.stall.wait()

    async def handle_handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello:
        await self._maybe_stall()
        if self.refuse is not None:
            raise ProtocolError(self.refuse, f"{self.name} refuses")
        self.hellos.append((hello, caller))
        return self.answer_hello

    async def handle_gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest:
        await self._maybe_stall()
        if self.refuse is not None:
            raise ProtocolError(self.refuse, f"{self.name} refuses")
        self.digests.append(digest)
        return self.answer_digest

    async def handle_push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk],
                          caller: Caller) -> pb.Receipt:
        got: list[pb.Chunk] = []
        async for chunk in chunks:
            if self.refuse is not None and len(got) == 1:
                raise ProtocolError(self.refuse, "refused mid-stream")
            got.append(chunk)
        self.pushes.append((start, got, caller))
        return pb.Receipt(accepted=True, bytes_received=sum(len(c.data) for c in got))

    async def handle_fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]:
        self.fetches.append(request)
        if self.refuse is not None:
            raise ProtocolError(self.refuse, "no state here")
        for i in range(request.from_chunk, len(self.state)):
            if self.fetch_stall_after is not None and i >= self.fetch_stall_after:
                await self.stall.wait()
            chunk = pb.Chunk(index=i, data=self.state[i], last=i == len(self.state) - 1)
            self.sent_chunks.append(chunk)
            yield chunk


async def pair(network: MemoryNetwork | None = None) -> tuple[MemoryNetwork, MemoryTransport, MemoryTransport,
                                                              Recorder]:
    """A client node `a` and a server node `b`, both listening."""
    network = network or MemoryNetwork()
    a, b = MemoryTransport(network, "a"), MemoryTransport(network, "b")
    await a.serve(Recorder("a"), "mem:0")
    server = Recorder("b")
    await b.serve(server, "mem:0")
    return network, a, b, server


async def stream(chunks: list[pb.Chunk], hook=None) -> AsyncIterator[pb.Chunk]:
    for i, chunk in enumerate(chunks):
        if hook is not None:
            hook(i)
        yield chunk


def push_chunks(n: int) -> list[pb.Chunk]:
    start = pb.EnvelopeStart(header=b"hdr", signature=b"s", sender_certificate_der=b"c")
    return [pb.Chunk(start=start)] + [pb.Chunk(index=i, data=bytes([i]) * (i + 1), last=i == n - 1)
                                      for i in range(n)]


def call_error(excinfo) -> PeerCallError:
    error = excinfo.value
    assert isinstance(error, PeerCallError)
    assert "\n" not in str(error)
    return error


# ------------------------------------------------------------------------------------------- unary


def test_serve_allocates_distinct_addresses_or_uses_the_given_one():
    async def scenario():
        network = MemoryNetwork()
        x, y, z = (MemoryTransport(network, n) for n in "xyz")
        ax, ay = await x.serve(Recorder("x"), "mem:0"), await y.serve(Recorder("y"), "")
        az = await z.serve(Recorder("z"), "site-z:7700")
        assert len({ax, ay, az}) == 3 and az == "site-z:7700"
        assert set(network.handlers) == {ax, ay, az}
        await y.close()
        assert ay not in network.handlers
    asyncio.run(scenario())


def test_unary_calls_deliver_copies_both_ways():
    async def scenario():
        _, a, b, server = await pair()
        hello = pb.SignedHello(body=b"from-a", signature=b"s")
        reply = await a.handshake(b.address, hello, timeout=5)
        assert reply == server.answer_hello and reply is not server.answer_hello
        [(received, caller)] = server.hellos
        assert received == hello and received is not hello
        assert caller == Caller("a")  # the server learns who called
        reply.body = b"mutated by the client"
        hello.body = b"changed after sending"
        assert server.answer_hello.body == b"b"
        assert received.body == b"from-a"

        digest = pb.Digest(sender_id="a", records=[pb.PeerRecord(heartbeat=1)])
        answer = await a.gossip(b.address, digest, timeout=5)
        assert answer == server.answer_digest
        answer.records[0].heartbeat = 999
        digest.records[0].heartbeat = 555
        assert server.answer_digest.records[0].heartbeat == 7
        assert server.digests[0].records[0].heartbeat == 1
    asyncio.run(scenario())


@pytest.mark.parametrize("reason", [Reason.TOKENIZER_MISMATCH, Reason.BAD_SIGNATURE, Reason.STALE_ROUND,
                                    Reason.MALFORMED, Reason.NOT_READY, Reason.RATE_LIMITED])
def test_protocol_error_becomes_peer_call_error_with_reason_and_status(reason):
    async def scenario():
        _, a, b, server = await pair()
        server.refuse = reason
        for call in (a.handshake(b.address, pb.SignedHello(), 5), a.gossip(b.address, pb.Digest(), 5)):
            with pytest.raises(PeerCallError) as info:
                await call
            error = call_error(info)
            assert error.reason == reason
            assert error.code == status_code_for(reason)
            assert error.address == b.address
            assert error.detail == "b refuses"
            assert not error.unreachable  # a refusal is not a network failure
    asyncio.run(scenario())


def test_status_codes_for_reasons():
    assert status_code_for(Reason.TOKENIZER_MISMATCH) == "FAILED_PRECONDITION"
    assert status_code_for(Reason.BAD_CERTIFICATE) == "UNAUTHENTICATED"
    assert status_code_for(Reason.OVERSIZE) == "RESOURCE_EXHAUSTED"
    assert status_code_for(Reason.MALFORMED) == "INVALID_ARGUMENT"  # the default


# ------------------------------------------------------------------------------------------ faults


def test_unreachable_address_is_unavailable():
    async def scenario():
        _, a, _, _ = await pair()
        with pytest.raises(PeerCallError) as info:
            await a.handshake("mem:nobody", pb.SignedHello(), 5)
        error = call_error(info)
        assert error.code == "UNAVAILABLE" and error.reason == Reason.REASON_UNSPECIFIED and error.unreachable
    asyncio.run(scenario())


def test_closed_server_is_unreachable():
    async def scenario():
        _, a, b, _ = await pair()
        await a.gossip(b.address, pb.Digest(), 5)
        await b.close()
        with pytest.raises(PeerCallError) as info:
            await a.gossip(b.address, pb.Digest(), 5)
        assert call_error(info).unreachable
    asyncio.run(scenario())


def test_partition_cuts_both_directions_and_heal_restores():
    async def scenario():
        network, a, b, server = await pair()
        c = MemoryTransport(network, "c")
        await c.serve(Recorder("c"), "mem:0")
        network.partition([a.address], [b.address])
        for src, dst in ((a, b), (b, a)):
            with pytest.raises(PeerCallError) as info:
                await src.gossip(dst.address, pb.Digest(), 5)
            assert call_error(info).code == "UNAVAILABLE"
        assert server.digests == []  # nothing got through
        await c.gossip(b.address, pb.Digest(), 5)  # other links are unaffected
        await a.gossip(c.address, pb.Digest(), 5)
        network.heal()
        await a.gossip(b.address, pb.Digest(sender_id="a"), 5)
        assert [d.sender_id for d in server.digests] == ["", "a"]
    asyncio.run(scenario())


def test_latency_delays_calls():
    async def scenario():
        network, a, b, _ = await pair()
        network.latency_s[b.address] = 0.05
        started = time.monotonic()
        await a.handshake(b.address, pb.SignedHello(), 5)
        assert time.monotonic() - started >= 0.05
        network.latency_s[a.address] = 0.03  # latency on both ends adds up
        started = time.monotonic()
        await a.gossip(b.address, pb.Digest(), 5)
        assert time.monotonic() - started >= 0.08
    asyncio.run(scenario())


def test_latency_beyond_the_deadline_is_deadline_exceeded():
    async def scenario():
        network, a, b, _ = await pair()
        network.latency_s[b.address] = 30.0  # far beyond the deadline: no load can blur the two
        started = time.monotonic()
        with pytest.raises(PeerCallError) as info:
            await a.handshake(b.address, pb.SignedHello(), timeout=0.05)
        assert call_error(info).code == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started < 10.0  # the deadline cut the call short, not the latency
    asyncio.run(scenario())


def test_deadline_exceeded_on_a_stalled_handler():
    async def scenario():
        _, a, b, server = await pair()
        server.stalled = True
        started = time.monotonic()
        for call in (a.handshake(b.address, pb.SignedHello(), timeout=0.1),
                     a.gossip(b.address, pb.Digest(), timeout=0.1)):
            with pytest.raises(PeerCallError) as info:
                await call
            error = call_error(info)
            assert error.code == "DEADLINE_EXCEEDED" and error.reason == Reason.REASON_UNSPECIFIED
            assert error.unreachable
        assert 0.2 <= time.monotonic() - started < 3.0
    asyncio.run(scenario())


# ----------------------------------------------------------------------------------------- streams


def test_push_delivers_all_chunks_in_order_and_counts_bytes():
    async def scenario():
        network, a, b, server = await pair()
        chunks = push_chunks(6)
        receipt = await a.push(b.address, stream(chunks), timeout=5)
        data_bytes = sum(len(c.data) for c in chunks[1:])
        assert receipt.accepted and receipt.bytes_received == data_bytes
        [(start, got, caller)] = server.pushes
        assert start == chunks[0].start and caller.node_id == "a"
        assert [c.index for c in got] == list(range(6))
        assert got == chunks[1:]
        got[0].data = b"server scribbles"  # copied on the way: the sender's chunks are untouched
        start.header = b"server scribbles"
        assert chunks[1].data == b"\x00" and chunks[0].start.header == b"hdr"
        assert network.bytes_moved == data_bytes
        await a.push(b.address, stream(push_chunks(3)), timeout=5)
        assert network.bytes_moved == data_bytes + 1 + 2 + 3  # it accumulates
    asyncio.run(scenario())


def test_push_without_start_or_empty_is_malformed():
    async def scenario():
        _, a, b, server = await pair()
        with pytest.raises(PeerCallError) as info:
            await a.push(b.address, stream([]), timeout=5)
        assert call_error(info).reason == Reason.MALFORMED
        with pytest.raises(PeerCallError) as info:
            await a.push(b.address, stream(push_chunks(2)[1:]), timeout=5)
        error = call_error(info)
        assert error.reason == Reason.MALFORMED and error.code == "INVALID_ARGUMENT"
        assert server.pushes == []
    asyncio.run(scenario())


def test_push_refused_mid_stream_is_a_typed_error():
    async def scenario():
        _, a, b, server = await pair()
        server.refuse = Reason.TAMPERED
        with pytest.raises(PeerCallError) as info:
            await a.push(b.address, stream(push_chunks(4)), timeout=5)
        error = call_error(info)
        assert error.reason == Reason.TAMPERED and error.code == status_code_for(Reason.TAMPERED)
    asyncio.run(scenario())


def test_push_cut_mid_stream_is_unavailable():
    async def scenario():
        network, a, b, server = await pair()

        def cut_at(i: int) -> None:
            if i == 3:
                network.partition([a.address], [b.address])

        with pytest.raises(PeerCallError) as info:
            await a.push(b.address, stream(push_chunks(6), hook=cut_at), timeout=5)
        assert call_error(info).code == "UNAVAILABLE"
        assert server.pushes == []
        assert network.bytes_moved == 1 + 2  # only the chunks sent before the cut
    asyncio.run(scenario())


def test_push_deadline_exceeded_when_the_sender_stalls():
    async def scenario():
        _, a, b, _ = await pair()
        never = asyncio.Event()

        async def stalling() -> AsyncIterator[pb.Chunk]:
            chunks = push_chunks(3)
            yield chunks[0]
            yield chunks[1]
            await never.wait()

        with pytest.raises(PeerCallError) as info:
            await a.push(b.address, stalling(), timeout=0.1)
        assert call_error(info).code == "DEADLINE_EXCEEDED"
    asyncio.run(scenario())


def test_fetch_streams_chunks_in_order_and_counts_bytes():
    async def scenario():
        network, a, b, server = await pair()
        got = [c async for c in a.fetch(b.address, pb.StateRequest(requester_id="a", min_round=3), timeout=5)]
        assert [c.data for c in got] == server.state
        assert [c.index for c in got] == [0, 1, 2] and got[-1].last
        assert network.bytes_moved == sum(len(s) for s in server.state)
        assert server.fetches[0].min_round == 3 and server.fetches[0].requester_id == "a"
        resumed = [c async for c in a.fetch(b.address, pb.StateRequest(from_chunk=2), timeout=5)]
        assert [c.index for c in resumed] == [2]
        got[0].data = b"mutated"  # copies, not the server's objects
        assert server.sent_chunks[0].data == b"alpha"
    asyncio.run(scenario())


def test_fetch_refusal_unreachable_and_deadline():
    async def scenario():
        network, a, b, server = await pair()
        server.refuse = Reason.NO_STATE
        with pytest.raises(PeerCallError) as info:
            [c async for c in a.fetch(b.address, pb.StateRequest(), timeout=5)]
        error = call_error(info)
        assert error.reason == Reason.NO_STATE and error.code == "NOT_FOUND"

        server.refuse = None
        with pytest.raises(PeerCallError) as info:
            [c async for c in a.fetch("mem:nobody", pb.StateRequest(), timeout=5)]
        assert call_error(info).code == "UNAVAILABLE"

        server.fetch_stall_after = 1
        received: list[pb.Chunk] = []
        with pytest.raises(PeerCallError) as info:
            async for chunk in a.fetch(b.address, pb.StateRequest(), timeout=0.1):
                received.append(chunk)
        assert call_error(info).code == "DEADLINE_EXCEEDED"
        assert [c.index for c in received] == [0]  # what came before the stall was delivered
    asyncio.run(scenario())


def test_fetch_cut_mid_stream_is_unavailable():
    async def scenario():
        network, a, b, _ = await pair()
        received = []
        with pytest.raises(PeerCallError) as info:
            async for chunk in a.fetch(b.address, pb.StateRequest(), timeout=5):
                received.append(chunk.index)
                network.partition([a.address], [b.address])
        assert call_error(info).code == "UNAVAILABLE"
        assert received == [0]
    asyncio.run(scenario())
