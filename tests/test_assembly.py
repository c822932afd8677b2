"""The one node assembly: what it signs, what it serves, and that the Hello has one owner."""

from __future__ import annotations

import asyncio
import tomllib
from pathlib import Path

from helpers_pki import make_mesh

from fednode.config import parse_config, to_toml
from fednode.node.assembly import Compatibility, assemble_context, serve_peers
from fednode.security.envelope import PayloadKey
from fednode.security.hello import verify_hello
from fednode.security.trust import TrustStore
from fednode.store.journal import Journal
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.v1 import peer_pb2 as pb


class _Echo:
    """The smallest peer handler: answers a handshake with the node's own Hello."""

    def __init__(self) -> None:
        self.ctx = None

    async def handle_handshake(self, hello, caller):
        return self.ctx.own_hello

    async def handle_gossip(self, digest, caller):
        return pb.Digest()

    async def handle_push(self, start, chunks, caller):
        return pb.Receipt()

    def handle_fetch(self, request, caller):
        raise NotImplementedError


def _context(tmp_path: Path, ids, network: MemoryNetwork, listen: str = "mem:0", advertise: str = ""):
    node = {"name": "a", "data_dir": str(tmp_path / "a"), "listen": listen}
    if advertise:
        node["advertise"] = advertise
    cfg = parse_config(tomllib.loads(to_toml({"node": node})), tmp_path)
    (tmp_path / "a").mkdir(exist_ok=True)
    identity = ids["a"]
    return assemble_context(cfg, identity, TrustStore(identity.ca_pem), Journal.open(tmp_path / "a" / "journal.db"),
                            PayloadKey.load_or_create(tmp_path / "a" / "payload.key"),
                            MemoryTransport(network, "a"), Compatibility("tok-hash", "fam-hash"))


def test_the_hello_is_signed_by_the_node_and_carries_its_compatibility_and_payload_key(tmp_path):
    ids = make_mesh(tmp_path / "pki", ("a", "b"))
    ctx = _context(tmp_path, ids, MemoryNetwork())
    body = verify_hello(TrustStore(ids["b"].ca_pem), ctx.own_hello)  # a peer can check it
    assert (body.node_id, body.tokenizer_hash, body.family_hash) == ("a", "tok-hash", "fam-hash")
    assert body.payload_public_key == ctx.payload_key.public_bytes()
    assert body == ctx.own_body == ctx.membership.self_member.body
    assert ctx.own_hello is ctx.membership.self_member.hello  # one owner: the membership


def test_serving_on_port_0_announces_the_bound_address_before_any_peer_sees_it(tmp_path):
    ids = make_mesh(tmp_path / "pki", ("a", "b"))
    network = MemoryNetwork()
    ctx = _context(tmp_path, ids, network, listen="mem:0", advertise="mem:0")
    handler = _Echo()
    handler.ctx = ctx

    async def main() -> pb.SignedHello:
        bound = await serve_peers(ctx, handler)
        assert bound != "mem:0" and bound in network.handlers
        caller = MemoryTransport(network, "b")
        return await caller.handshake(bound, pb.SignedHello(), timeout=2.0)

    seen = asyncio.run(main())
    body = verify_hello(TrustStore(ids["b"].ca_pem), seen)
    assert body.address == ctx.own_body.address != "mem:0"
    assert ctx.membership.self_member.heartbeat == 2  # serving ticks the first heartbeat


def test_a_renewed_heartbeat_chain_is_signed_with_the_certificate_in_force(tmp_path):
    """After a reload swaps the certificate, running out of heartbeats re-signs with the new one."""
    ids = make_mesh(tmp_path / "pki", ("a", "b"))
    ctx = _context(tmp_path, ids, MemoryNetwork())
    renewed_identity = make_mesh(tmp_path / "pki2", ("a",))["a"]
    ctx.identity = renewed_identity
    chain = ctx.membership.chain
    assert chain is not None
    for _ in range(chain.length + 1):
        ctx.membership.tick()
    assert ctx.own_hello.certificate_der == renewed_identity.cert_der
    assert ctx.own_body.heartbeat_anchor != chain.anchor and ctx.own_body.heartbeat_base > 1
    verify_hello(TrustStore(renewed_identity.ca_pem), ctx.own_hello)
