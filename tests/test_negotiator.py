"""Negotiation on the wire: signed records in gossip, refusals counted, the ack/commit flow."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

from helpers_pki import UNCHAINED, make_mesh

from fednode.config import parse_config, to_toml
from fednode.mesh import negotiation as neg
from fednode.mesh.membership import Membership
from fednode.node.context import NodeContext
from fednode.node.negotiator import Negotiator, proposal_to_pb
from fednode.observability.metrics import NodeMetrics
from fednode.security.envelope import PayloadKey
from fednode.security.hello import sign_hello
from fednode.security.trust import TrustStore
from fednode.store.journal import Journal
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.v1 import peer_pb2 as pb

NAMES = ("a", "b", "c")


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def hello(identity, address: str) -> tuple[pb.SignedHello, pb.HelloBody]:
    body = pb.HelloBody(node_id=identity.node_id, protocol_version=1, tokenizer_hash="t", family_hash="f",
                        payload_public_key=PayloadKey.generate().public_bytes(), address=address, incarnation=1,
                        **UNCHAINED)
    return sign_hello(identity, body), body


def signed_record(identity, rec: pb.NegotiationRecord) -> pb.SignedBlob:
    body = rec.SerializeToString(deterministic=True)
    return pb.SignedBlob(body=body, signature=identity.sign(body), certificate_der=identity.cert_der)


def make_node(tmp_path: Path, ids, me: str = "a"):
    identity = ids[me]
    cfg = parse_config(tomllib.loads(to_toml({
        "node": {"name": me, "data_dir": str(tmp_path / me), "listen": "mem:1"},
        "negotiation": {"min_live_peers": 3, "plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0,
                        "min_round_gap": 0}})), tmp_path)
    own_hello, own_body = hello(identity, "mem:1")
    clock = Clock()
    membership = Membership(own_hello, own_body, TrustStore(identity.ca_pem), suspect_after=5, dead_after=10,
                            clock=clock)
    ctx = NodeContext(cfg, identity, TrustStore(identity.ca_pem), PayloadKey.generate(),
                      Journal.open(tmp_path / me / "journal.db"), membership,
                      MemoryTransport(MemoryNetwork(), me), NodeMetrics(me))
    return ctx, Negotiator(ctx, ceiling=3, max_level=3, enabled=True)


def gossip_record(ctx: NodeContext, identity, heartbeat: int, rec: pb.NegotiationRecord | None,
                  blob: pb.SignedBlob | None = None):
    signed, _ = hello(identity, f"mem:{identity.node_id}")
    existing = ctx.membership.members.get(identity.node_id)
    record = pb.PeerRecord(hello=existing.hello if existing else signed, heartbeat=heartbeat)
    if blob is not None or rec is not None:
        record.negotiation.CopyFrom(blob if blob is not None else signed_record(identity, rec))
    return ctx.membership.merge(pb.Digest(sender_id=identity.node_id, records=[record]))


def base_record(node_id: str, seq: int, round_: int = 1) -> pb.NegotiationRecord:
    return pb.NegotiationRecord(node_id=node_id, seq=seq, round=round_, ceiling=3, messenger_loss=5.0)


def test_forged_record_is_refused_and_proposal_from_a_non_proposer_is_counted(tmp_path):
    ids = make_mesh(tmp_path / "pki", NAMES)
    ctx, negotiator = make_node(tmp_path, ids)
    for n in ("b", "c"):
        gossip_record(ctx, ids[n], 1, base_record(n, 1))
    # c's record signed by b: refused at the membership layer, c's last good record is kept
    outcome = gossip_record(ctx, ids["c"], 2, None, blob=signed_record(ids["b"], base_record("c", 2)))
    assert [(peer, exc.reason) for peer, exc in outcome.refused] == [("c", pb.BAD_SIGNATURE)]
    assert ctx.membership.members["c"].negotiation.seq == 1

    live = ["a", "b", "c"]
    true_proposer = neg.proposer_for(1, live)
    liar = next(n for n in ("b", "c") if n != true_proposer)
    bogus = neg.Proposal(epoch=1, level=1, activate_round=4, proposer=liar, growth_seed=neg.growth_seed(1, 1),
                         direction=neg.Direction.GROW)
    rec = base_record(liar, 3)
    rec.proposal.CopyFrom(proposal_to_pb(bogus))
    gossip_record(ctx, ids[liar], 3, rec)
    negotiator.after_round(1, 5.0, 100, 0, b"")
    negotiator.after_round(2, 5.0, 100, 0, b"")  # counted once, not at every round
    samples = {s.labels["reason"]: s.value for m in ctx.metrics.rejected.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert true_proposer == "a"  # sha256 order for ids a, b, c at epoch 1: we are the rightful proposer
    assert samples.get("NOT_PROPOSER") == 1.0  # the liar's proposal: counted once ...
    assert negotiator.ack is None or negotiator.ack.proposer == "a"  # ... and never acked
    # ... and it could not block us: we proposed ourselves
    assert negotiator.proposal is not None and negotiator.proposal.proposer == "a"
    ctx.journal.close()


def test_ack_and_commit_flow_from_signed_records(tmp_path):
    ids = make_mesh(tmp_path / "pki", NAMES)
    live = ["a", "b", "c"]
    proposer = neg.proposer_for(1, live)
    me = next(n for n in live if n != proposer)
    other = next(n for n in live if n not in (proposer, me))
    ctx, negotiator = make_node(tmp_path, ids, me)
    proposal = neg.Proposal(epoch=1, level=1, activate_round=4, proposer=proposer,
                            growth_seed=neg.growth_seed(1, 1), direction=neg.Direction.GROW)
    p_rec = base_record(proposer, 1)
    p_rec.proposal.CopyFrom(proposal_to_pb(proposal))
    p_rec.ack.CopyFrom(proposal_to_pb(proposal))
    gossip_record(ctx, ids[proposer], 1, p_rec)
    gossip_record(ctx, ids[other], 1, base_record(other, 1))
    negotiator.after_round(1, 5.0, 100, 0, b"")
    assert negotiator.ack == proposal  # we ack a valid proposal from the rightful proposer ...
    published = ctx.membership.self_member.negotiation
    assert published.ack.epoch == 1 and published.node_id == me  # ... in our own signed record
    negotiator.after_round(2, 5.0, 100, 0, b"")
    # proposer + us = 2 of 3 live: a quorum, so every peer concludes the commit from its own view
    assert negotiator.committed.epoch == 1 and negotiator.committed.level == 1
    assert negotiator.level_for(3) == 0 and negotiator.level_for(4) == 1  # activates at a future round
    assert ctx.journal.get_meta("agreement") is not None
    assert math.isclose(negotiator.mesh_losses[-1], 5.0)
    ctx.journal.close()


def test_an_invalid_proposal_from_the_rightful_proposer_is_counted_once_and_held_on(tmp_path):
    """negotiate's outcome, applied: the refusal counted once per (proposer, epoch), the hold shown, the
    quorum level in status capped at max_level."""
    ids = make_mesh(tmp_path / "pki", NAMES)
    live = ["a", "b", "c"]
    proposer = neg.proposer_for(1, live)
    me = next(n for n in live if n != proposer)
    other = next(n for n in live if n not in (proposer, me))
    ctx, negotiator = make_node(tmp_path, ids, me)
    two_steps = neg.Proposal(epoch=1, level=2, activate_round=4, proposer=proposer,
                             growth_seed=neg.growth_seed(1, 2), direction=neg.Direction.GROW)
    p_rec = base_record(proposer, 1)
    p_rec.ceiling = 9
    p_rec.proposal.CopyFrom(proposal_to_pb(two_steps))
    o_rec = base_record(other, 1)
    o_rec.ceiling = 9  # 2 of 3 live afford 9: status shows it capped at max_level 3
    gossip_record(ctx, ids[proposer], 1, p_rec)
    gossip_record(ctx, ids[other], 1, o_rec)
    for round_ in (1, 2):
        negotiator.after_round(round_, 5.0, 100, 0, b"")
        assert negotiator.ack is None and negotiator.proposal is None
        assert negotiator.last_decision == ("hold: open proposal not valid in this view "
                                            "(BAD_LEVEL: growth must go from 0 to 1, not 2)")
        assert negotiator.quorum_level == 3
    samples = {s.labels["reason"]: s.value for m in ctx.metrics.rejected.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert samples.get("BAD_LEVEL") == 1.0  # counted once, not at every round it is still gossiped
    assert [d for _, d, _ in negotiator.decisions] == [negotiator.last_decision] * 2
    ctx.journal.close()


def test_agreement_heard_from_a_peer_wins_when_newer_and_plausible(tmp_path):
    ids = make_mesh(tmp_path / "pki", NAMES)
    ctx, negotiator = make_node(tmp_path, ids)
    good = neg.Agreement(epoch=3, level=2, previous_level=1, activate_round=9, proposer="b",
                         growth_seed=neg.growth_seed(3, 2))
    proof = pb.Agreement(epoch=3, level=2, previous_level=1, activate_round=9, proposer="b",
                         growth_seed=good.growth_seed)
    rec = base_record("b", 1)
    rec.committed.CopyFrom(proof)
    bad = base_record("c", 1)
    bad.committed.CopyFrom(pb.Agreement(epoch=7, level=2, previous_level=1, activate_round=9, proposer="c",
                                        growth_seed=12345))  # a seed no honest commit can have
    gossip_record(ctx, ids["b"], 1, rec)
    gossip_record(ctx, ids["c"], 1, bad)
    negotiator.after_round(1, 5.0, 100, 0, b"")
    assert negotiator.committed.epoch == 0  # b alone is 1 of 3 live: no proof yet
    agree = base_record("c", 2)
    agree.committed.CopyFrom(proof)
    gossip_record(ctx, ids["c"], 2, agree)
    negotiator.after_round(2, 5.0, 100, 0, b"")
    assert negotiator.committed == good  # b and c sign it: 2 of 3 live, a quorum
    samples = {s.labels["reason"]: s.value for m in ctx.metrics.rejected.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert samples.get("BAD_SEED") == 1.0 and samples.get("UNPROVEN_AGREEMENT") == 1.0
    ctx.journal.close()


def test_one_member_cannot_steer_the_mesh_with_a_committed_agreement_of_its_own(tmp_path):
    """Issue 11: gossiping `committed = (epoch 1000, level 3)`, or epoch 2**63, made every node adopt it."""
    ids = make_mesh(tmp_path / "pki", NAMES)
    ctx, negotiator = make_node(tmp_path, ids)
    liar = base_record("c", 1)
    liar.committed.CopyFrom(pb.Agreement(epoch=1000, level=3, previous_level=0, activate_round=2, proposer="c",
                                         growth_seed=neg.growth_seed(1000, 3)))
    gossip_record(ctx, ids["b"], 1, base_record("b", 1))
    gossip_record(ctx, ids["c"], 1, liar)
    for round_ in (1, 2, 3):
        negotiator.after_round(round_, 5.0, 100, 0, b"")
    assert negotiator.committed.epoch == 0 and negotiator.level_for(3) == 0
    huge = base_record("c", 2)
    huge.committed.CopyFrom(pb.Agreement(epoch=2**63, level=0, proposer="c", growth_seed=neg.growth_seed(2**63, 0)))
    outcome = gossip_record(ctx, ids["c"], 2, huge)
    assert [(p, e.reason) for p, e in outcome.refused] == [("c", pb.MALFORMED)]
    negotiator.after_round(4, 5.0, 100, 0, b"")  # the journal never sees the epoch
    assert negotiator.committed.epoch == 0
    samples = {s.labels["reason"]: s.value for m in ctx.metrics.rejected.collect() for s in m.samples
               if s.name.endswith("_total")}
    assert samples.get("UNPROVEN_AGREEMENT") == 1.0
    ctx.journal.close()
