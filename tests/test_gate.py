"""The node's gate, for real: `PeerGate` over a trust store holding a CA-signed revocation list,
served by the real mTLS gRPC transport. A revoked member reaches no handler on any RPC, gets the
list that proves why, and each refusal is counted once; and one member cannot flood the log."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers_pki import make_mesh
from helpers_transport import Recorder, push_chunks, stream

from fednode.errors import ProtocolError, Reason
from fednode.node.gate import REVOKED_LOG_EVERY_S, PeerGate, RefusalLog
from fednode.observability.metrics import NodeMetrics
from fednode.security.revocation import CRL_FILE, revoke_certificate
from fednode.security.trust import TrustStore
from fednode.transport.base import PeerCallError
from fednode.transport.grpc_transport import GrpcTransport
from fednode.v1 import peer_pb2 as pb


@pytest.fixture(scope="module")
def revoked_mesh(tmp_path_factory):
    """Nodes a (revoked), b (the server) and c (in good standing), and b's trust store with the list."""
    directory = tmp_path_factory.mktemp("pki")
    ids = make_mesh(directory, ("a", "b", "c"))
    revoke_certificate(directory, "a")
    trust = TrustStore(ids["b"].ca_pem)
    assert trust.consider_revocation_list((directory / CRL_FILE).read_bytes()) is not None
    return ids, trust


async def _every_rpc(client: GrpcTransport, address: str) -> list[object]:
    """Each RPC once: its reply, or the PeerCallError it ended in."""
    calls = [
        lambda: client.handshake(address, pb.SignedHello(body=b"x"), 5.0),
        lambda: client.gossip(address, pb.Digest(sender_id="x"), 5.0),
        lambda: client.push(address, stream(push_chunks(40)), 5.0),
        lambda: _fetched(client, address),
    ]
    out: list[object] = []
    for call in calls:
        try:
            out.append(await call())
        except PeerCallError as exc:
            out.append(exc)
    return out


async def _fetched(client: GrpcTransport, address: str) -> list[pb.Chunk]:
    return [c async for c in client.fetch(address, pb.StateRequest(requester_id="x"), 5.0)]


def test_a_revoked_member_reaches_no_handler_gets_the_list_and_is_counted_once_per_call(revoked_mesh):
    ids, trust = revoked_mesh
    metrics = NodeMetrics("b")
    handler = Recorder("b")

    async def scenario() -> tuple[list[object], list[object]]:
        server = GrpcTransport(ids["b"])
        address = await server.serve(handler, "127.0.0.1:0", PeerGate(trust, metrics))
        revoked, good = GrpcTransport(ids["a"]), GrpcTransport(ids["c"])
        try:
            return await _every_rpc(revoked, address), await _every_rpc(good, address)
        finally:
            for t in (revoked, good, server):
                await t.close(0)

    refused, served = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert all(isinstance(e, PeerCallError) for e in refused), refused
    for error in refused:
        assert isinstance(error, PeerCallError)
        assert (error.reason, error.code) == (Reason.BAD_CERTIFICATE, "UNAUTHENTICATED")
        assert error.revocation_list is not None and trust.revocation is not None
        assert error.revocation_list == trust.revocation.der  # the CA-signed proof, as the trust store holds it
    assert metrics.refusals() == {"BAD_CERTIFICATE": 4}  # once per call, never twice
    assert not any(isinstance(r, PeerCallError) for r in served), served  # c is served on every RPC
    assert [c.node_id for _, c in handler.hellos] == ["c"] and len(handler.pushes) == 1  # a never got in
    assert [c.node_id for _, c in handler.fetches] == ["c"]


def test_a_refusal_a_caller_can_repeat_at_will_is_counted_each_time_but_logged_once_a_minute(caplog):
    """A request that does not decode is refused before the rate limiter runs: a member sending
    garbage must not fill the node's log (RATE_LIMITED and revoked callers are quiet the same way)."""
    metrics = NodeMetrics("b")
    log = RefusalLog(metrics)
    caplog.set_level(logging.INFO, logger="fednode.node.gate")
    for _ in range(100):
        log(ProtocolError(Reason.MALFORMED, "not a Digest"), "mallory")
        log(ProtocolError(Reason.RATE_LIMITED, "too fast"), "mallory")
    log(ProtocolError(Reason.MALFORMED, "not a Digest"), "carol")  # another member logs its own
    assert metrics.refusals() == {"MALFORMED": 101, "RATE_LIMITED": 100}
    lines = [(r.peer, r.reason) for r in caplog.records]  # type: ignore[attr-defined]
    assert sorted(lines) == [("carol", "MALFORMED"), ("mallory", "MALFORMED"), ("mallory", "RATE_LIMITED")]
    assert REVOKED_LOG_EVERY_S >= 60


def test_other_refusals_are_logged_every_time():
    """A refusal after the rate limit (a bad signature, a tampered envelope) is rare and worth a line each."""
    metrics = NodeMetrics("b")
    log = RefusalLog(metrics)
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append  # type: ignore[method-assign]
    logger = logging.getLogger("fednode.node.gate")
    logger.addHandler(handler)
    try:
        for _ in range(3):
            log(ProtocolError(Reason.BAD_SIGNATURE, "forged"), "mallory")
    finally:
        logger.removeHandler(handler)
    assert len(seen) == 3 and all(r.levelno == logging.WARNING for r in seen)


def test_the_gate_refuses_an_unreadable_certificate_and_a_name_that_is_not_the_certificates(revoked_mesh):
    from fednode.transport.base import Caller

    ids, trust = revoked_mesh
    gate = PeerGate(trust, NodeMetrics("b"))
    gate.admit(Caller("c", ids["c"].cert_der))  # in good standing
    gate.admit(Caller("twin-node"))  # no TLS at all (the in-memory twin): nothing to check
    for caller, says in [(Caller("c", b""), "cannot be read"), (Caller("x", ids["c"].cert_der), "is not its")]:
        with pytest.raises(ProtocolError, match=says) as info:
            gate.admit(caller)
        assert info.value.reason == Reason.BAD_CERTIFICATE


def test_a_certificate_of_another_ca_never_reaches_the_gate_or_the_handler(revoked_mesh, tmp_path):
    ids, trust = revoked_mesh
    outsider = make_mesh(tmp_path / "other-ca", ("c",))["c"]  # the right name, the wrong CA
    metrics, handler = NodeMetrics("b"), Recorder("b")

    async def scenario() -> PeerCallError:
        server, client = GrpcTransport(ids["b"]), GrpcTransport(outsider)
        address = await server.serve(handler, "127.0.0.1:0", PeerGate(trust, metrics))
        try:
            with pytest.raises(PeerCallError) as info:
                await client.gossip(address, pb.Digest(sender_id="c"), 5.0)
            return info.value
        finally:
            await client.close(0)
            await server.close(0)

    error = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert error.code == "UNAVAILABLE" and error.reason == Reason.REASON_UNSPECIFIED  # refused in the TLS handshake
    assert handler.digests == [] and metrics.refusals() == {}
