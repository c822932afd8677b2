"""One assembly of the parts every node shares: payload key, counters, heartbeat chain, signed
Hello, membership and context, then serving the peer service and announcing the bound address.

The daemon and the transport benchmark's receiver both build a node here (the in-process harness
runs whole daemons), so a part added to a node is added once and no caller patches the context
after it is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from fednode import PROTOCOL_VERSION
from fednode.config import Config
from fednode.mesh.membership import Membership
from fednode.node.context import NodeContext
from fednode.observability.metrics import NodeMetrics
from fednode.security.envelope import PayloadKey
from fednode.security.heartbeat import HeartbeatChain
from fednode.security.hello import sign_hello
from fednode.security.identity import NodeIdentity
from fednode.security.trust import TrustStore
from fednode.store.journal import Journal
from fednode.transport.base import PeerHandler, Transport
from fednode.v1 import peer_pb2 as pb


@dataclass(frozen=True)
class Compatibility:
    """What a peer's Hello must match for messengers to be exchangeable (the learner's hashes)."""

    tokenizer_hash: str
    family_hash: str


def assemble_context(cfg: Config, identity: NodeIdentity, trust: TrustStore, journal: Journal,
                     payload_key: PayloadKey, transport: Transport, compatibility: Compatibility) -> NodeContext:
    """A node's context, its Hello signed for the configured address (`serve_peers` re-signs it for
    the bound one). The caller opens the files (journal, payload key) first, so that a damaged one
    fails the start before anything slow runs."""
    chain = HeartbeatChain()
    body = pb.HelloBody(node_id=identity.node_id, protocol_version=PROTOCOL_VERSION,
                        tokenizer_hash=compatibility.tokenizer_hash, family_hash=compatibility.family_hash,
                        payload_public_key=payload_key.public_bytes(), address=cfg.advertise,
                        incarnation=journal.next_incarnation(), issued_unix_ms=int(time.time() * 1000),
                        heartbeat_anchor=chain.anchor, heartbeat_base=1)

    def renew(new_chain: HeartbeatChain, base: int) -> pb.SignedHello:
        """Our heartbeat chain ran out: the same Hello with the new chain's anchor, signed with the
        certificate in force now (a reload may have replaced it)."""
        renewed = pb.HelloBody()
        renewed.CopyFrom(ctx.own_body)
        renewed.heartbeat_anchor, renewed.heartbeat_base = new_chain.anchor, base
        return sign_hello(ctx.identity, renewed)

    membership = Membership(sign_hello(identity, body), body, trust, suspect_after=cfg.mesh.suspect_after_s,
                            dead_after=cfg.mesh.dead_after_s, chain=chain, renew=renew,
                            on_start=transport.forget)
    ctx = NodeContext(cfg, identity, trust, payload_key, journal, membership, transport,
                      NodeMetrics(identity.node_id))
    return ctx


async def serve_peers(ctx: NodeContext, handler: PeerHandler) -> str:
    """Serve `handler` at `[node] listen` behind the node's gate (every caller's certificate checked
    against the trust store, every refusal counted: `fednode.node.gate.PeerGate`); returns the bound
    address. An advertised port 0 becomes the bound port, and the Hello is signed again for it
    before any peer can see it."""
    bound = await ctx.transport.serve(handler, ctx.cfg.node.listen, ctx.gate)
    if ctx.cfg.advertise.endswith(":0"):
        body = pb.HelloBody()
        body.CopyFrom(ctx.own_body)
        body.address = bound
        ctx.membership.announce(sign_hello(ctx.identity, body))
    ctx.membership.tick(last_round=ctx.committed_round)
    return bound
