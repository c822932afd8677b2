"""The transport contract: one suite, run over every Transport a node can be given.

"grpc" is the real mTLS transport on loopback (both ends with certificates of one test CA),
"memory" the in-process twin, "faulty" the fault wrapper (an empty plan) over the twin. Whatever
the node relies on (addresses, delivery both ways, typed refusals with their status codes and
revocation lists, the caller the handler sees, the gate around every call, unreachable peers,
deadlines, streams in order) must hold for each. What only the twin has (partitions, latency,
copy semantics, bytes moved) is in tests/test_transport_twin.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from helpers_pki import make_mesh
from helpers_transport import Recorder, RecordingGate, push_chunks, stream

from fednode.errors import ProtocolError, Reason
from fednode.transport.base import (
    MAX_ATTACHED_REVOCATION_LIST,
    Caller,
    PeerCallError,
    Transport,
    status_code_for,
)
from fednode.transport.endpoint import INTERNAL_DETAIL
from fednode.transport.faults import FaultPlan, FaultyTransport
from fednode.transport.grpc_transport import GrpcTransport
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.v1 import peer_pb2 as pb

RPCS = ("handshake", "gossip", "push", "fetch")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_mesh(tmp_path_factory.mktemp("pki"), ("a", "b"))


@dataclass
class Pair:
    """Node "a" (`client`) calling node "b" (`server`, serving `handler` behind `gate` at `address`)."""

    client: Transport
    server: Transport
    address: str
    handler: Recorder
    gate: RecordingGate
    caller: Caller  # who the server's handler must see calling: node "a"
    nowhere: str  # an address nobody serves


@pytest.fixture(params=["grpc", "memory", "faulty"])
def connect(request, pki):
    kind = request.param

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Pair]:
        if kind == "grpc":
            client: Transport = GrpcTransport(pki["a"])
            server: Transport = GrpcTransport(pki["b"])
            listen, nowhere, caller = "127.0.0.1:0", "127.0.0.1:1", Caller("a", pki["a"].cert_der)
        else:
            network = MemoryNetwork()
            client, server = MemoryTransport(network, "a"), MemoryTransport(network, "b")
            if kind == "faulty":
                client, server = FaultyTransport(client, FaultPlan), FaultyTransport(server, FaultPlan)
            listen, nowhere, caller = "mem:0", "mem:nobody", Caller("a")
        handler, gate = Recorder("b"), RecordingGate()
        address = await server.serve(handler, listen, gate)
        try:
            yield Pair(client, server, address, handler, gate, caller, nowhere)
        finally:
            await client.close(0)
            await server.close(0)

    return make


def run(scenario) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


async def call(pair: Pair, rpc: str, timeout: float = 5.0, address: str | None = None) -> object:
    """One call of `rpc` from a to b (or `address`): its reply, or the fetched chunks."""
    to = address or pair.address
    if rpc == "handshake":
        return await pair.client.handshake(to, pb.SignedHello(body=b"from-a", signature=b"s"), timeout)
    if rpc == "gossip":
        return await pair.client.gossip(to, pb.Digest(sender_id="a", records=[pb.PeerRecord(heartbeat=1)]), timeout)
    if rpc == "push":
        return await pair.client.push(to, stream(push_chunks(3)), timeout)
    return [c async for c in pair.client.fetch(to, pb.StateRequest(requester_id="a"), timeout)]


async def refusal(pair: Pair, rpc: str, timeout: float = 5.0, address: str | None = None) -> PeerCallError:
    with pytest.raises(PeerCallError) as info:
        await call(pair, rpc, timeout, address)
    error = info.value
    assert error.address == (address or pair.address)
    assert "\n" not in str(error)
    return error


# ----------------------------------------------------------------------------------- serving, unary


def test_serve_returns_a_usable_address(connect):
    async def scenario():
        async with connect() as pair:
            assert pair.address and not pair.address.endswith(":0")  # port 0 was resolved
            assert await call(pair, "gossip") == pair.handler.answer_digest
    run(scenario)


def test_unary_calls_deliver_both_ways_and_the_handler_sees_the_calling_node(connect):
    async def scenario():
        async with connect() as pair:
            assert await call(pair, "handshake") == pair.handler.answer_hello
            [(hello, caller)] = pair.handler.hellos
            assert hello == pb.SignedHello(body=b"from-a", signature=b"s")
            assert caller == pair.caller  # for gRPC: named by a's client certificate

            assert await call(pair, "gossip") == pair.handler.answer_digest
            [(digest, caller)] = pair.handler.digests
            assert digest.sender_id == "a" and digest.records[0].heartbeat == 1
            assert caller == pair.caller
    run(scenario)


def test_calls_go_on_after_forget_and_set_identity(connect, pki):
    """Both are the base interface (no transport is probed for them): a peer forgotten is dialled
    afresh, a reloaded identity is used from the next connection; either way calls go on."""
    async def scenario():
        async with connect() as pair:
            await call(pair, "gossip")
            pair.client.forget(pair.address)
            pair.client.forget(pair.nowhere)  # nothing known there: nothing to do
            await call(pair, "gossip")
            pair.client.set_identity(pki["a"])  # e.g. a reloaded (here: the same) certificate
            pair.server.set_identity(pki["b"])
            await call(pair, "handshake")
            assert [c for _, c in pair.handler.digests] == [pair.caller] * 2
            assert [c for _, c in pair.handler.hellos] == [pair.caller]
    run(scenario)


def test_every_rpc_passes_the_gate_once_with_the_calling_node(connect):
    async def scenario():
        async with connect() as pair:
            for rpc in RPCS:
                await call(pair, rpc)
            assert pair.gate.admitted == [pair.caller] * len(RPCS)
            assert pair.gate.refusals == []
            assert [c for _, _, c in pair.handler.pushes] == [pair.caller]
            assert [c for _, c in pair.handler.fetches] == [pair.caller]
    run(scenario)


@pytest.mark.parametrize("rpc", RPCS)
def test_a_handler_refusal_arrives_typed_with_its_status_code_and_is_counted_once(connect, rpc):
    reasons = [Reason.TOKENIZER_MISMATCH, Reason.BAD_SIGNATURE, Reason.STALE_ROUND, Reason.NO_STATE,
               Reason.NOT_READY, Reason.RATE_LIMITED, Reason.TAMPERED]

    async def scenario():
        async with connect() as pair:
            for reason in reasons:
                pair.handler.refuse = reason
                error = await refusal(pair, rpc)
                assert (error.reason, error.code) == (reason, status_code_for(reason))
                assert error.detail == {"push": "refused mid-stream", "fetch": "no state here"}.get(rpc, "b refuses")
                assert not error.unreachable  # a refusal is not a network failure
                assert error.revocation_list is None
            assert pair.gate.refusals == [(reason, pair.caller) for reason in reasons]
    run(scenario)


@pytest.mark.parametrize("rpc", RPCS)
def test_a_handler_bug_is_an_internal_error_for_the_caller_and_the_server_serves_on(connect, rpc):
    """An unexpected exception in the node's handler (a bug, not a refusal): the caller gets a
    PeerCallError INTERNAL with a fixed text and no reason (its round loop handles it like any
    failed call; no exception message crosses), and the next call is served."""
    async def scenario():
        async with connect() as pair:
            pair.handler.crash = True
            error = await refusal(pair, rpc)
            assert (error.code, error.reason, error.detail) == ("INTERNAL", Reason.REASON_UNSPECIFIED, INTERNAL_DETAIL)
            assert not error.unreachable and pair.gate.refusals == []  # a bug is not a refusal of the caller
            pair.handler.crash = False
            await call(pair, rpc)
    run(scenario)


def test_status_codes_for_reasons():
    assert status_code_for(Reason.TOKENIZER_MISMATCH) == "FAILED_PRECONDITION"
    assert status_code_for(Reason.BAD_CERTIFICATE) == "UNAUTHENTICATED"
    assert status_code_for(Reason.OVERSIZE) == "RESOURCE_EXHAUSTED"
    assert status_code_for(Reason.NO_STATE) == "NOT_FOUND"
    assert status_code_for(Reason.MALFORMED) == "INVALID_ARGUMENT"  # the default


# --------------------------------------------------------------------------- the gate, revocation


@pytest.mark.parametrize("rpc", RPCS)
def test_a_caller_the_gate_refuses_never_reaches_the_handler_and_gets_the_revocation_list(connect, rpc):
    crl = b"\x30\x82 a CA-signed list, unverified by the transport"

    async def scenario():
        async with connect() as pair:
            pair.gate.refuse = ProtocolError(Reason.BAD_CERTIFICATE, "certificate of a is revoked",
                                             revocation_list=crl)
            error = await refusal(pair, rpc)
            assert (error.reason, error.code) == (Reason.BAD_CERTIFICATE, "UNAUTHENTICATED")
            assert error.detail == "certificate of a is revoked"
            assert error.revocation_list == crl
            assert pair.gate.refusals == [(Reason.BAD_CERTIFICATE, pair.caller)]
            handler = pair.handler
            assert (handler.hellos, handler.digests, handler.pushes, handler.fetches) == ([], [], [], [])
    run(scenario)


def test_a_handler_refusal_carries_its_revocation_list_unless_it_is_too_large(connect):
    async def scenario():
        async with connect() as pair:
            pair.handler.refuse = Reason.BAD_CERTIFICATE
            pair.handler.refusal_list = b"L" * MAX_ATTACHED_REVOCATION_LIST
            for rpc in RPCS:
                assert (await refusal(pair, rpc)).revocation_list == pair.handler.refusal_list
            pair.handler.refusal_list = b"L" * (MAX_ATTACHED_REVOCATION_LIST + 1)  # it spreads by gossip instead
            for rpc in RPCS:
                error = await refusal(pair, rpc)
                assert error.reason == Reason.BAD_CERTIFICATE and error.revocation_list is None
    run(scenario)


# ------------------------------------------------------------------------ the network's failures


@pytest.mark.parametrize("rpc", RPCS)
def test_an_address_nobody_serves_is_unreachable(connect, rpc):
    async def scenario():
        async with connect() as pair:
            error = await refusal(pair, rpc, address=pair.nowhere)
            assert error.code == "UNAVAILABLE" and error.reason == Reason.REASON_UNSPECIFIED
            assert error.unreachable and error.revocation_list is None
    run(scenario)


def test_a_closed_server_is_unreachable(connect):
    async def scenario():
        async with connect() as pair:
            await call(pair, "gossip")
            await pair.server.close(0)
            for rpc in RPCS:
                error = await refusal(pair, rpc)
                assert error.unreachable and error.code == "UNAVAILABLE", rpc
    run(scenario)


def test_a_deadline_on_a_stalled_handler_is_deadline_exceeded(connect):
    async def scenario():
        async with connect() as pair:
            pair.handler.stalled = True
            started = time.monotonic()
            for rpc in ("handshake", "gossip"):
                error = await refusal(pair, rpc, timeout=0.2)
                assert error.code == "DEADLINE_EXCEEDED" and error.reason == Reason.REASON_UNSPECIFIED
                assert error.unreachable
            assert 0.4 <= time.monotonic() - started < 5.0
    run(scenario)


# ----------------------------------------------------------------------------------------- streams


def test_push_delivers_the_chunks_in_order_with_their_byte_count(connect):
    async def scenario():
        async with connect() as pair:
            chunks = push_chunks(6)
            receipt = await pair.client.push(pair.address, stream(chunks), timeout=5)
            assert receipt.accepted and receipt.bytes_received == sum(len(c.data) for c in chunks[1:]) == 21
            [(start, got, caller)] = pair.handler.pushes
            assert start == chunks[0].start and caller == pair.caller
            assert got == chunks[1:] and [c.index for c in got] == list(range(6))
    run(scenario)


def test_a_push_without_its_envelope_start_is_malformed_and_counted(connect):
    async def scenario():
        async with connect() as pair:
            for chunks in ([], push_chunks(2)[1:]):
                error = await pair_push_refusal(pair, chunks)
                assert (error.reason, error.code) == (Reason.MALFORMED, "INVALID_ARGUMENT")
            assert pair.handler.pushes == []
            assert pair.gate.refusals == [(Reason.MALFORMED, pair.caller)] * 2
    run(scenario)


async def pair_push_refusal(pair: Pair, chunks: list[pb.Chunk], timeout: float = 5.0) -> PeerCallError:
    with pytest.raises(PeerCallError) as info:
        await pair.client.push(pair.address, stream(chunks), timeout)
    return info.value


def test_a_push_refused_mid_stream_is_typed(connect):
    async def scenario():
        async with connect() as pair:
            pair.handler.refuse = Reason.TAMPERED
            error = await pair_push_refusal(pair, push_chunks(50))
            assert (error.reason, error.code) == (Reason.TAMPERED, status_code_for(Reason.TAMPERED))
            assert error.detail == "refused mid-stream"
            assert pair.handler.pushes == []
    run(scenario)


def test_a_push_whose_sender_stalls_ends_at_the_deadline(connect):
    async def scenario():
        async with connect() as pair:
            never = asyncio.Event()

            async def stalling() -> AsyncIterator[pb.Chunk]:
                chunks = push_chunks(3)
                yield chunks[0]
                yield chunks[1]
                await never.wait()

            with pytest.raises(PeerCallError) as info:
                await pair.client.push(pair.address, stalling(), timeout=0.2)
            assert info.value.code == "DEADLINE_EXCEEDED" and info.value.unreachable
    run(scenario)


def test_fetch_streams_the_state_in_order_and_resumes_where_asked(connect):
    async def scenario():
        async with connect() as pair:
            got = [c async for c in pair.client.fetch(pair.address, pb.StateRequest(requester_id="a", min_round=3),
                                                      timeout=5)]
            assert [c.data for c in got] == pair.handler.state
            assert [c.index for c in got] == [0, 1, 2] and got[-1].last and not got[0].last
            [(request, caller)] = pair.handler.fetches
            assert (request.requester_id, request.min_round) == ("a", 3) and caller == pair.caller
            resumed = [c async for c in pair.client.fetch(pair.address, pb.StateRequest(from_chunk=2), timeout=5)]
            assert [c.index for c in resumed] == [2]
    run(scenario)


def test_fetch_refused_mid_stream_is_typed_after_what_came_before(connect):
    async def scenario():
        async with connect() as pair:
            pair.handler.fetch_refuse_after = 1
            received: list[int] = []
            with pytest.raises(PeerCallError) as info:
                async for chunk in pair.client.fetch(pair.address, pb.StateRequest(), timeout=5):
                    received.append(chunk.index)
            assert received == [0]
            error = info.value
            assert (error.reason, error.code, error.detail) == (Reason.NO_STATE, "NOT_FOUND",
                                                                "state withdrawn mid-stream")
            assert pair.gate.refusals == [(Reason.NO_STATE, pair.caller)]
    run(scenario)


def test_a_fetch_that_stalls_ends_at_the_deadline_after_what_came_before(connect):
    async def scenario():
        async with connect() as pair:
            pair.handler.fetch_stall_after = 1
            received: list[int] = []
            with pytest.raises(PeerCallError) as info:
                async for chunk in pair.client.fetch(pair.address, pb.StateRequest(), timeout=0.3):
                    received.append(chunk.index)
            assert info.value.code == "DEADLINE_EXCEEDED" and info.value.unreachable
            assert received == [0]
    run(scenario)
