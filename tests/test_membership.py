"""Gossip membership: verified peer records, versioned merges, local liveness, convergence."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
from helpers_pki import make_ca, make_identity

from fednode.errors import Reason
from fednode.mesh.membership import Liveness, Membership, liveness
from fednode.security.heartbeat import HeartbeatChain
from fednode.security.hello import sign_hello
from fednode.security.identity import NodeIdentity
from fednode.security.signed import sign_farewell
from fednode.security.trust import TrustStore
from fednode.v1 import peer_pb2 as pb

SUSPECT, DEAD = 6.0, 20.0
NAMES = ("n1", "n2", "n3", "n4")


class Clock:
    """A fake monotonic clock: tests move time explicitly."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> dict[str, NodeIdentity]:
    ca_dir = make_ca(tmp_path_factory.mktemp("ca"))
    return {name: make_identity(ca_dir, name) for name in NAMES}


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> NodeIdentity:
    ca_dir = make_ca(tmp_path_factory.mktemp("foreign-ca"), name="other mesh CA")
    return make_identity(ca_dir, "n9")


CHAIN = 512  # heartbeats per test chain (the daemon's are CHAIN_LENGTH long)


def body_for(identity: NodeIdentity, *, incarnation: int = 1, tokenizer: str = "tok-1",
             node_id: str | None = None, chain: HeartbeatChain | None = None) -> pb.HelloBody:
    return pb.HelloBody(node_id=node_id or identity.node_id, protocol_version=1, tokenizer_hash=tokenizer,
                        family_hash="fam-1", payload_public_key=os.urandom(32),
                        address=f"127.0.0.1:{7700 + int(identity.node_id[1:])}", incarnation=incarnation,
                        issued_unix_ms=1, heartbeat_anchor=(chain or HeartbeatChain(length=1)).anchor,
                        heartbeat_base=1)


@dataclass
class Node:
    identity: NodeIdentity
    body: pb.HelloBody
    hello: pb.SignedHello
    view: Membership
    chain: HeartbeatChain


def make_node(identity: NodeIdentity, clock: Clock, **body_kw) -> Node:
    chain = HeartbeatChain(length=CHAIN)
    body = body_for(identity, chain=chain, **body_kw)
    hello = sign_hello(identity, body)
    view = Membership(hello, body, TrustStore(identity.ca_pem), suspect_after=SUSPECT, dead_after=DEAD,
                      clock=clock, chain=chain)
    return Node(identity, body, hello, view, chain)


def record(node: Node, heartbeat: int, *, left: bool = False, last_round: int = 0) -> pb.PeerRecord:
    """`node`'s own record at `heartbeat`, proven by its chain (and its signed farewell if it left)."""
    rec = pb.PeerRecord(hello=node.hello, heartbeat=heartbeat, left=left, last_round=last_round,
                        heartbeat_proof=node.chain.proof(heartbeat - 1) if 1 < heartbeat <= CHAIN + 1 else b"")
    if left:
        rec.farewell.CopyFrom(sign_farewell(node.identity, node.body.incarnation))
    return rec


def digest(sender: str, *records: pb.PeerRecord) -> pb.Digest:
    return pb.Digest(sender_id=sender, records=list(records))


def snapshot(view: Membership) -> dict[str, tuple[int, int, bool]]:
    """The whole mesh as this view sees it, itself included."""
    out = {view.node_id: (*view.self_member.version, view.self_member.left)}
    out.update({nid: (*m.version, m.left) for nid, m in view.members.items()})
    return out


# ------------------------------------------------------------------------------------ verification


def test_merge_learns_a_verified_peer(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    outcome = a.view.merge(digest("n2", record(b, 3, last_round=7)))
    assert outcome.joined == ["n2"] and outcome.refused == [] and outcome.updated == 0
    member = a.view.members["n2"]
    assert member.node_id == "n2" and member.address == b.body.address
    assert member.body.payload_public_key == b.body.payload_public_key
    assert member.version == (1, 3) and member.last_round == 7
    assert a.view.state_of("n2") is Liveness.ALIVE


def test_merge_hello_learns_a_peer_with_heartbeat_zero(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    assert a.view.merge_hello(b.hello).joined == ["n2"]
    assert a.view.members["n2"].version == (1, 0)
    # any gossip record of it is newer
    assert a.view.merge(digest("n3", record(b, 1))).updated == 1


def _tampered_body(hello: pb.SignedHello) -> pb.SignedHello:
    body = pb.HelloBody.FromString(hello.body)
    body.address = "6.6.6.6:7700"  # a relay redirects the peer's traffic
    return pb.SignedHello(body=body.SerializeToString(deterministic=True), signature=hello.signature,
                          certificate_der=hello.certificate_der)


def test_tampered_hello_is_refused_and_not_added(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    forged = pb.PeerRecord(hello=_tampered_body(b.hello), heartbeat=5)
    outcome = a.view.merge(digest("n3", forged))
    assert outcome.joined == [] and "n2" not in a.view.members
    [(who, error)] = outcome.refused
    assert who == "n2" and error.reason == Reason.BAD_SIGNATURE


def test_signature_by_another_mesh_key_is_refused(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    forged = pb.SignedHello(body=b.hello.body, signature=mesh["n3"].sign(b.hello.body),
                            certificate_der=b.hello.certificate_der)
    outcome = a.view.merge(digest("n3", pb.PeerRecord(hello=forged, heartbeat=1)))
    assert [e.reason for _, e in outcome.refused] == [Reason.BAD_SIGNATURE]
    assert a.view.members == {}


def test_hello_speaking_for_another_node_is_refused(mesh):
    clock = Clock()
    a = make_node(mesh["n1"], clock)
    evil = mesh["n3"]
    body = body_for(mesh["n2"]).SerializeToString(deterministic=True)  # claims to be n2, signed by n3
    hello = pb.SignedHello(body=body, signature=evil.sign(body), certificate_der=evil.cert_der)
    outcome = a.view.merge(digest("n3", pb.PeerRecord(hello=hello, heartbeat=1)))
    assert [e.reason for _, e in outcome.refused] == [Reason.BAD_CERTIFICATE]
    assert a.view.members == {}


def test_tampered_update_of_a_known_peer_is_refused_and_the_old_record_kept(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    a.view.merge(digest("n2", record(b, 2)))
    outcome = a.view.merge(digest("n3", pb.PeerRecord(hello=_tampered_body(b.hello), heartbeat=9)))
    assert [e.reason for _, e in outcome.refused] == [Reason.BAD_SIGNATURE]
    assert a.view.members["n2"].address == b.body.address and a.view.members["n2"].version == (1, 2)


def test_known_peer_record_with_garbage_signature_does_not_replace_the_verified_hello(mesh):
    clock = Clock()
    a, b, c = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock), make_node(mesh["n3"], clock)
    a.view.merge(digest("n2", record(b, 2)))
    garbage = pb.SignedHello(body=b.hello.body, signature=b"\x00" * 70, certificate_der=b.hello.certificate_der)
    a.view.merge(digest("n4", pb.PeerRecord(hello=garbage, heartbeat=3)))
    # whatever we accepted, what we relay about n2 must still verify for a newcomer
    outcome = c.view.merge(a.view.digest())
    assert outcome.refused == []
    assert "n2" in c.view.members


def test_hello_from_a_foreign_ca_is_refused(mesh, foreign):
    clock = Clock()
    a = make_node(mesh["n1"], clock)
    stranger = make_node(foreign, clock)
    outcome = a.view.merge(digest("n9", record(stranger, 1)))
    assert [(who, e.reason) for who, e in outcome.refused] == [("n9", Reason.BAD_CERTIFICATE)]
    assert a.view.members == {}
    assert a.view.merge_hello(stranger.hello).refused[0][1].reason == Reason.BAD_CERTIFICATE


def test_incompatible_tokenizer_is_refused(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock, tokenizer="tok-OTHER")
    outcome = a.view.merge(digest("n2", record(b, 1)))
    assert [(who, e.reason) for who, e in outcome.refused] == [("n2", Reason.TOKENIZER_MISMATCH)]
    assert a.view.members == {}


def test_garbage_body_is_refused(mesh):
    clock = Clock()
    a = make_node(mesh["n1"], clock)
    hello = pb.SignedHello(body=b"\xff\xff\xff", signature=b"x", certificate_der=mesh["n2"].cert_der)
    outcome = a.view.merge(digest("n2", pb.PeerRecord(hello=hello, heartbeat=1)))
    assert len(outcome.refused) == 1 and a.view.members == {}


# ---------------------------------------------------------------------------------------- versions


def test_newer_version_wins_and_older_is_ignored(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    a.view.merge(digest("n2", record(b, 5, last_round=5)))
    outcome = a.view.merge(digest("n3", record(b, 4, last_round=4)))  # older heartbeat: ignored
    assert outcome.updated == 0 and a.view.members["n2"].version == (1, 5)
    assert a.view.members["n2"].last_round == 5
    outcome = a.view.merge(digest("n3", record(b, 5, left=True)))  # same version: ignored
    assert outcome.updated == 0 and not a.view.members["n2"].left
    outcome = a.view.merge(digest("n3", record(b, 6, last_round=6)))
    assert outcome.updated == 1 and a.view.members["n2"].version == (1, 6)
    assert a.view.members["n2"].last_round == 6


def test_restarted_peer_replaces_the_old_record(mesh):
    clock = Clock()
    a, old = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock, incarnation=1)
    a.view.merge(digest("n2", record(old, 50)))
    new = make_node(mesh["n2"], clock, incarnation=2)  # a new payload key and heartbeat reset to 1
    outcome = a.view.merge(digest("n2", record(new, 1)))
    assert outcome.updated == 1 and outcome.refused == []
    member = a.view.members["n2"]
    assert member.version == (2, 1)
    assert member.body.payload_public_key == new.body.payload_public_key
    # the old incarnation, even with a huge heartbeat, no longer wins
    assert a.view.merge(digest("n3", record(old, 10_000))).updated == 0
    assert a.view.members["n2"].version == (2, 1)


def test_a_peer_first_seen_or_restarted_is_announced_so_its_old_connection_is_dropped(mesh):
    clock = Clock()
    a, old = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock, incarnation=1)
    started: list[str] = []
    a.view.on_start = started.append
    a.view.merge(digest("n2", record(old, 2)))
    a.view.merge(digest("n2", record(old, 3)))  # a heartbeat: the same daemon, nothing to redial
    assert started == [old.body.address]
    new = make_node(mesh["n2"], clock, incarnation=2)
    a.view.merge(digest("n2", record(new, 1)))
    assert started == [old.body.address, new.body.address]


def test_our_own_record_is_never_overwritten(mesh):
    clock = Clock()
    a = make_node(mesh["n1"], clock)
    a_restarted_elsewhere = make_node(mesh["n1"], clock, incarnation=9)  # validly signed with our key
    before = a.view.self_member.version
    outcome = a.view.merge(digest("n2", record(a_restarted_elsewhere, 1000, left=True)))
    assert outcome.joined == [] and outcome.updated == 0
    assert "n1" not in a.view.members
    assert a.view.self_member.version == before and not a.view.self_member.left
    assert a.view.self_member.hello == a.hello


# ---------------------------------------------------------------------------------------- liveness


def test_liveness_alive_suspect_dead_and_back(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    a.view.merge(digest("n2", record(b, 1)))
    assert a.view.state_of("n2") is Liveness.ALIVE
    clock.advance(SUSPECT - 0.01)
    a.view.merge(digest("n2", record(b, 1)))  # the same version again is not a sign of life
    assert a.view.state_of("n2") is Liveness.ALIVE
    clock.advance(0.01)
    assert a.view.state_of("n2") is Liveness.SUSPECT
    assert [m.node_id for m in a.view.live()] == ["n2"] and a.view.alive() == []
    clock.advance(DEAD - SUSPECT)
    assert a.view.state_of("n2") is Liveness.DEAD
    assert a.view.live() == [] and a.view.counts()["dead"] == 1
    a.view.merge(digest("n2", record(b, 2)))  # the heartbeat grew
    assert a.view.state_of("n2") is Liveness.ALIVE
    assert a.view.counts() == {"alive": 1, "suspect": 0, "dead": 0, "left": 0}


def test_liveness_is_a_pure_function_of_age(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    a.view.merge(digest("n2", record(b, 1)))
    member = a.view.members["n2"]
    t0 = member.changed_at
    assert liveness(member, t0, 1.0, 2.0) is Liveness.ALIVE
    assert liveness(member, t0 + 1.0, 1.0, 2.0) is Liveness.SUSPECT
    assert liveness(member, t0 + 2.0, 1.0, 2.0) is Liveness.DEAD


def test_left_shows_left_and_is_not_live(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    a.view.merge(b.view.digest())
    assert a.view.state_of("n2") is Liveness.ALIVE
    b.view.leave(sign_farewell(b.identity, b.body.incarnation))
    a.view.merge(b.view.digest())
    assert a.view.state_of("n2") is Liveness.LEFT
    assert a.view.live() == [] and a.view.alive() == []
    assert a.view.counts()["left"] == 1
    clock.advance(DEAD * 2)
    assert a.view.state_of("n2") is Liveness.LEFT  # left stays left, never "dead"
    assert a.view.gossip_targets(3, random.Random(0)) == []  # nobody to gossip with


def test_tick_advances_our_heartbeat_and_last_round(mesh):
    clock = Clock()
    a = make_node(mesh["n1"], clock)
    assert a.view.self_member.version == (1, 1)
    a.view.tick()
    a.view.tick(last_round=4)
    assert a.view.self_member.version == (1, 3) and a.view.self_member.last_round == 4
    [own] = [r for r in a.view.digest().records if pb.HelloBody.FromString(r.hello.body).node_id == "n1"]
    assert own.heartbeat == 3 and own.last_round == 4


# ------------------------------------------------------------------------- liveness from the owner


def test_a_relayer_passes_on_proven_heartbeats_but_cannot_invent_one(mesh):
    clock = Clock()
    a, b, c = (make_node(mesh[n], clock) for n in ("n1", "n2", "n3"))
    for _ in range(5):
        b.view.tick()
    c.view.merge(b.view.digest())
    a.view.merge(c.view.digest())  # b's genuine record, relayed by c: believed
    assert a.view.members["n2"].version == (1, 6)
    # c (a member gone bad) keeps b "alive" after b stopped: a higher heartbeat without b's chain value
    for forged_proof in (b"", os.urandom(32), a.view.members["n2"].proof):
        forged = pb.PeerRecord(hello=b.hello, heartbeat=7, heartbeat_proof=forged_proof)
        outcome = a.view.merge(digest("n3", forged))
        assert [(p, e.reason) for p, e in outcome.refused] == [("n2", Reason.BAD_SIGNATURE)]
    clock.advance(DEAD)
    assert a.view.members["n2"].version == (1, 6) and a.view.state_of("n2") is Liveness.DEAD
    b.view.tick()  # b is back: its own next heartbeat is proven again
    a.view.merge(b.view.digest())
    assert a.view.members["n2"].version == (1, 7) and a.view.state_of("n2") is Liveness.ALIVE


def test_a_jump_is_checked_from_the_last_verified_value_or_the_anchor(mesh):
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    a.view.merge(digest("n2", record(b, 40)))  # first sight: 39 hashes back to the anchor
    a.view.merge(digest("n2", record(b, 300)))  # a partition later: 260 hashes to the last value
    assert a.view.members["n2"].version == (1, 300)
    huge = pb.PeerRecord(hello=b.hello, heartbeat=2**40, heartbeat_proof=os.urandom(32))
    assert a.view.merge(digest("n3", huge)).refused[0][1].reason == Reason.BAD_SIGNATURE  # beyond any chain


def test_a_leave_counts_only_with_the_owners_farewell_for_this_incarnation(mesh):
    clock = Clock()
    a, b, c = (make_node(mesh[n], clock) for n in ("n1", "n2", "n3"))
    a.view.merge(digest("n2", record(b, 3)))
    no_farewell = record(b, 4)
    no_farewell.left = True
    wrong_signer = record(b, 4, left=True)
    wrong_signer.farewell.CopyFrom(sign_farewell(c.identity, 1))  # c says goodbye for b
    old = record(b, 4, left=True)
    old.farewell.CopyFrom(sign_farewell(b.identity, 0))  # b's farewell of an earlier incarnation
    for forged in (no_farewell, wrong_signer, old):
        outcome = a.view.merge(digest("n3", forged))
        assert [(p, e.reason) for p, e in outcome.refused] == [("n2", Reason.BAD_SIGNATURE)]
        assert a.view.state_of("n2") is Liveness.ALIVE
    a.view.merge(digest("n3", record(b, 4, left=True)))  # b's own goodbye, relayed: believed
    assert a.view.state_of("n2") is Liveness.LEFT


def test_an_exhausted_chain_renews_the_signed_hello_and_peers_follow(mesh):
    clock = Clock()
    a = make_node(mesh["n1"], clock)
    identity = mesh["n2"]
    chain = HeartbeatChain(length=4)
    body = body_for(identity, chain=chain)

    def renew(new_chain: HeartbeatChain, base: int) -> pb.SignedHello:
        body.heartbeat_anchor, body.heartbeat_base = new_chain.anchor, base
        return sign_hello(identity, body)

    b = Membership(sign_hello(identity, body), body, TrustStore(identity.ca_pem), suspect_after=SUSPECT,
                   dead_after=DEAD, clock=clock, chain=chain, renew=renew)
    anchors = set()
    for _ in range(12):
        b.tick()
        anchors.add(bytes(b.self_member.body.heartbeat_anchor))
        outcome = a.view.merge(b.digest())
        assert outcome.refused == [], outcome.refused
        assert a.view.members["n2"].version == b.self_member.version
    assert len(anchors) >= 3  # renewed twice, each time re-signed and verified


def test_two_daemons_with_one_identity_are_refused_and_the_owner_is_told(mesh, caplog):
    """A copied config: a second daemon runs n2's certificate at another address in the same
    incarnation. Peers keep the first and refuse the second (DUPLICATE_IDENTITY) instead of
    switching keys every gossip; the real n2 logs who impersonates it. A restart (new incarnation)
    is still believed."""
    clock = Clock()
    a, b = make_node(mesh["n1"], clock), make_node(mesh["n2"], clock)
    copy = make_node(mesh["n2"], clock)  # same certificate, its own payload key, same incarnation
    copy.body.address = "127.0.0.1:9999"
    copy.hello = sign_hello(mesh["n2"], copy.body)
    a.view.merge(digest("n2", record(b, 3)))
    outcome = a.view.merge(digest("n3", record(copy, 5)))
    assert [(p, e.reason) for p, e in outcome.refused] == [("n2", Reason.DUPLICATE_IDENTITY)]
    assert a.view.members["n2"].body.payload_public_key == b.body.payload_public_key
    with caplog.at_level("ERROR"):
        b.view.merge(digest("n3", record(copy, 5)))
        b.view.merge(digest("n3", record(copy, 6)))
    errors = [r for r in caplog.records if "another daemon announces" in r.getMessage()]
    assert len(errors) == 1 and "127.0.0.1:9999" in errors[0].getMessage()  # once per address
    import fednode.mesh.membership as membership_module

    calls = []
    real_verify = membership_module.verify_hello
    membership_module.verify_hello = lambda trust, hello: calls.append(1) or real_verify(trust, hello)
    try:
        b.view.merge(digest("n1", b.view.self_member.record()))  # our own record relayed back
    finally:
        membership_module.verify_hello = real_verify
    assert calls == []  # every digest carries it: recognised without a signature check
    restarted = make_node(mesh["n2"], clock, incarnation=2)
    assert a.view.merge(digest("n2", record(restarted, 2))).refused == []
    assert a.view.members["n2"].body.incarnation == 2


# ------------------------------------------------------------------------------------- convergence


def test_three_views_gossiping_pairwise_converge(mesh):
    clock = Clock()
    nodes = [make_node(mesh[name], clock) for name in ("n1", "n2", "n3")]
    rng = random.Random(3)
    # a line: n1 only ever talks to n2, n2 to n3; everybody keeps ticking
    for _ in range(3):
        for node in nodes:
            node.view.tick()
        for x, y in ((0, 1), (1, 2)):
            # push-pull: y merges x's digest, x merges y's answer
            nodes[y].view.merge(nodes[x].view.digest())
            nodes[x].view.merge(nodes[y].view.digest())
        clock.advance(rng.random())
    # one more full exchange without ticking lets the last versions spread
    for x, y in ((0, 1), (1, 2), (0, 1)):
        nodes[y].view.merge(nodes[x].view.digest())
        nodes[x].view.merge(nodes[y].view.digest())
    views = [snapshot(node.view) for node in nodes]
    assert set(views[0]) == {"n1", "n2", "n3"}
    assert views[0] == views[1] == views[2]
    assert views[0]["n1"] == (1, 4, False)  # the newest version of each node, not an old one
    for node in nodes:
        assert all(state is Liveness.ALIVE for state in node.view.states().values())


def test_random_pairwise_gossip_converges_after_churn(mesh):
    clock = Clock()
    nodes = [make_node(mesh[name], clock) for name in NAMES]
    rng = random.Random(11)
    for step in range(40):
        x, y = rng.sample(range(len(nodes)), 2)
        nodes[x].view.tick()
        if step == 20:  # n4 restarts with a new incarnation and a fresh membership view
            nodes[3] = make_node(mesh["n4"], clock, incarnation=2)
        nodes[y].view.merge(nodes[x].view.digest())
        nodes[x].view.merge(nodes[y].view.digest())
    for _ in range(3):  # quiesce: every pair exchanges (no more ticks)
        for x in range(len(nodes)):
            for y in range(len(nodes)):
                if x != y:
                    nodes[y].view.merge(nodes[x].view.digest())
    views = [snapshot(node.view) for node in nodes]
    assert all(v == views[0] for v in views)
    assert set(views[0]) == set(NAMES)
    assert views[0]["n4"][0] == 2  # everyone has the restarted incarnation
