"""What only the in-memory twin has: copy semantics, allocated addresses, partitions, latency, cuts
mid-stream and the bytes it moved. What every transport shares (delivery, typed refusals, the gate,
unreachable peers, deadlines, streams in order) is tests/test_transport_contract.py, run over the
twin too."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers_transport import Recorder, push_chunks, stream

from fednode.transport.base import OPEN_GATE, PeerCallError
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.v1 import peer_pb2 as pb


async def pair(network: MemoryNetwork | None = None) -> tuple[MemoryNetwork, MemoryTransport, MemoryTransport,
                                                              Recorder]:
    """A client node `a` and a server node `b`, both listening."""
    network = network or MemoryNetwork()
    a, b = MemoryTransport(network, "a"), MemoryTransport(network, "b")
    await a.serve(Recorder("a"), "mem:0", OPEN_GATE)
    server = Recorder("b")
    await b.serve(server, "mem:0", OPEN_GATE)
    return network, a, b, server


def call_error(excinfo) -> PeerCallError:
    error = excinfo.value
    assert isinstance(error, PeerCallError)
    assert "\n" not in str(error)
    return error


# --------------------------------------------------------------------------------- serving, copies


def test_serve_allocates_distinct_addresses_or_uses_the_given_one():
    async def scenario():
        network = MemoryNetwork()
        x, y, z = (MemoryTransport(network, n) for n in "xyz")
        ax, ay = await x.serve(Recorder("x"), "mem:0", OPEN_GATE), await y.serve(Recorder("y"), "", OPEN_GATE)
        az = await z.serve(Recorder("z"), "site-z:7700", OPEN_GATE)
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
        assert reply is not server.answer_hello
        [(received, _)] = server.hellos
        assert received is not hello
        reply.body = b"mutated by the client"
        hello.body = b"changed after sending"
        assert server.answer_hello.body == b"b"
        assert received.body == b"from-a"

        digest = pb.Digest(sender_id="a", records=[pb.PeerRecord(heartbeat=1)])
        answer = await a.gossip(b.address, digest, timeout=5)
        answer.records[0].heartbeat = 999
        digest.records[0].heartbeat = 555
        assert server.answer_digest.records[0].heartbeat == 7
        assert server.digests[0][0].records[0].heartbeat == 1
    asyncio.run(scenario())


# ------------------------------------------------------------------------------------------ faults


def test_partition_cuts_both_directions_and_heal_restores():
    async def scenario():
        network, a, b, server = await pair()
        c = MemoryTransport(network, "c")
        await c.serve(Recorder("c"), "mem:0", OPEN_GATE)
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
        assert [d.sender_id for d, _ in server.digests] == ["", "a"]
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


# ----------------------------------------------------------------------------------------- streams


def test_push_copies_the_chunks_and_counts_the_bytes_moved():
    async def scenario():
        network, a, b, server = await pair()
        chunks = push_chunks(6)
        await a.push(b.address, stream(chunks), timeout=5)
        data_bytes = sum(len(c.data) for c in chunks[1:])
        [(start, got, _)] = server.pushes
        got[0].data = b"server scribbles"  # copied on the way: the sender's chunks are untouched
        start.header = b"server scribbles"
        assert chunks[1].data == b"\x00" and chunks[0].start.header == b"hdr"
        assert network.bytes_moved == data_bytes
        await a.push(b.address, stream(push_chunks(3)), timeout=5)
        assert network.bytes_moved == data_bytes + 1 + 2 + 3  # it accumulates
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


def test_fetch_copies_the_chunks_and_counts_the_bytes_moved():
    async def scenario():
        network, a, b, server = await pair()
        got = [c async for c in a.fetch(b.address, pb.StateRequest(requester_id="a"), timeout=5)]
        assert network.bytes_moved == sum(len(s) for s in server.state)
        got[0].data = b"mutated"  # copies, not the server's objects
        assert server.sent_chunks[0].data == b"alpha"
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
