"""Gossip membership: verified peer records, versioned merges, local liveness, convergence."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import pytest
from helpers_pki import make_ca, make_identity

from fednode.errors import Reason
from fednode.mesh.membership import Liveness, Membership, liveness
from fednode.security.hello import sign_hello
from fednode.security.pki import NodeIdentity, TrustStore
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


def body_for(identity: NodeIdentity, *, incarnation: int = 1, tokenizer: str = "tok-1",
             node_id: str | None = None) -> pb.HelloBody:
    return pb.HelloBody(node_id=node_id or identity.node_id, protocol_version=1, tokenizer_hash=tokenizer,
                        family_hash="fam-1", payload_public_key=os.urandom(32),
                        address=f"127.0.0.1:{7700 + int(identity.node_id[1:])}", incarnation=incarnation,
                        issued_unix_ms=1)


@dataclass
class Node:
    identity: NodeIdentity
    body: pb.HelloBody
    hello: pb.SignedHello
    view: Membership


def make_node(identity: NodeIdentity, clock: Clock, **body_kw) -> Node:
    body = body_for(identity, **body_kw)
    hello = sign_hello(identity, body)
    view = Membership(hello, body, TrustStore(identity.ca_pem), suspect_after=SUSPECT, dead_after=DEAD,
                      clock=clock)
    return Node(identity, body, hello, view)


def record(node: Node, heartbeat: int, *, left: bool = False, last_round: int = 0) -> pb.PeerRecord:
    return pb.PeerRecord(hello=node.hello, heartbeat=heartbeat, left=left, last_round=last_round)


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
    b.view.leave()
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
