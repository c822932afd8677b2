"""Insider attacks (issue 11), decision by decision: what a member with a valid certificate sends is
bounded, screened and aggregated robustly. Pure functions and single components; the real-daemon
attacks are in tests/test_insider_mesh.py."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from helpers_pki import UNCHAINED, make_mesh

from fednode.config import parse_config, to_toml
from fednode.errors import ProtocolError, Reason
from fednode.learning import aggregate as agg
from fednode.learning.merge import Contribution, MergeRefused, clip_weights, round_weight_cap, weighted_merge
from fednode.mesh.membership import Membership
from fednode.node import catchup
from fednode.security import bounds
from fednode.security.envelope import EnvelopeOpener, EnvelopeSealer, PayloadKey
from fednode.security.hello import sign_hello
from fednode.security.signed import verify_negotiation
from fednode.security.trust import TrustStore
from fednode.v1 import peer_pb2 as pb

HUGE = 2**63


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    return make_mesh(tmp_path_factory.mktemp("pki"), ("a", "b", "c"))


def hello(identity, incarnation: int = 1):
    body = pb.HelloBody(node_id=identity.node_id, protocol_version=1, tokenizer_hash="t", family_hash="f",
                        payload_public_key=PayloadKey.generate().public_bytes(), address="mem:" + identity.node_id,
                        incarnation=incarnation, **UNCHAINED)
    return sign_hello(identity, body), body


def signed(identity, rec: pb.NegotiationRecord) -> pb.SignedBlob:
    body = rec.SerializeToString(deterministic=True)
    return pb.SignedBlob(body=body, signature=identity.sign(body), certificate_der=identity.cert_der)


# ------------------------------------------------------------------ 1. every integer from the wire is bounded

@pytest.mark.parametrize("field,value", [("epoch", HUGE), ("round", HUGE), ("level", 10**6),
                                         ("epoch", bounds.MAX_EPOCH + 1)])
def test_a_signed_header_with_a_huge_integer_is_malformed(ids, field, value):
    key = PayloadKey.generate()
    kw = {"epoch": 1, "round": 1, "level": 0, field: value}
    sealer = EnvelopeSealer(sender=ids["a"], recipient_id="b", recipient_public_key=key.public_bytes(),
                            kind="update", total_size=4, chunk_size=4, weight=1.0, **kw)
    with pytest.raises(ProtocolError) as err:
        EnvelopeOpener(sealer.start, trust=TrustStore(ids["a"].ca_pem), recipient_id="b", recipient_key=key)
    assert err.value.reason == Reason.MALFORMED and field in err.value.detail


@pytest.mark.parametrize("weight", [math.nan, math.inf, -1.0, 0.0, 1e30, 1e300])
def test_header_weights_out_of_range_are_malformed(weight):
    with pytest.raises(ProtocolError) as err:
        bounds.check_weight(weight)
    assert err.value.reason == Reason.MALFORMED
    assert bounds.check_weight(4096.0) == 4096.0


@pytest.mark.parametrize("mutate", [
    lambda r: r.committed.MergeFrom(pb.Agreement(epoch=HUGE)),
    lambda r: r.committed.MergeFrom(pb.Agreement(epoch=1, activate_round=HUGE)),
    lambda r: r.committed.MergeFrom(pb.Agreement(epoch=1, level=1000)),
    lambda r: r.proposal.MergeFrom(pb.Proposal(epoch=HUGE, proposer="a")),
    lambda r: r.ack.MergeFrom(pb.Proposal(epoch=1, activate_round=2**64 - 1)),
    lambda r: setattr(r, "seq", 2**64 - 1),
    lambda r: setattr(r, "round", 10**15),
    lambda r: setattr(r, "tokens", 2**64 - 1),
    lambda r: setattr(r, "ceiling", 2**32 - 1),
])
def test_a_signed_negotiation_record_with_a_huge_integer_is_malformed(ids, mutate):
    rec = pb.NegotiationRecord(node_id="a", seq=1, round=1, ceiling=3)
    mutate(rec)
    with pytest.raises(ProtocolError) as err:
        verify_negotiation(TrustStore(ids["a"].ca_pem), signed(ids["a"], rec), "a")
    assert err.value.reason == Reason.MALFORMED


@pytest.mark.parametrize("field", ["heartbeat", "last_round"])
def test_a_gossiped_record_with_a_huge_unsigned_field_is_refused_and_the_old_one_kept(ids, field):
    own_hello, own_body = hello(ids["a"])
    view = Membership(own_hello, own_body, TrustStore(ids["a"].ca_pem), suspect_after=5, dead_after=10)
    b_hello, _ = hello(ids["b"])
    view.merge(pb.Digest(records=[pb.PeerRecord(hello=b_hello, heartbeat=3, last_round=2)]))
    outcome = view.merge(pb.Digest(records=[pb.PeerRecord(hello=b_hello, **{"heartbeat": 4, "last_round": 2,
                                                                             field: 2**64 - 1})]))
    assert [(peer, exc.reason) for peer, exc in outcome.refused] == [("b", Reason.MALFORMED)]
    assert view.members["b"].heartbeat == 3 and view.members["b"].last_round == 2


def test_a_hello_with_a_huge_incarnation_is_malformed(ids):
    from fednode.security.hello import verify_hello

    signed_hello, _ = hello(ids["b"], incarnation=2**64 - 1)
    with pytest.raises(ProtocolError) as err:
        verify_hello(TrustStore(ids["a"].ca_pem), signed_hello)
    assert err.value.reason == Reason.MALFORMED


# ------------------------------------------------------------------ 2. catch-up from signed claims only

def test_a_liar_claiming_a_huge_round_does_not_set_the_catch_up_target():
    p = catchup.plan(10, 2, {"honest": 35, "liar": 10**6})
    assert p is not None and p.target == 35 and p.max_round == 37
    assert p.donors == ("honest", "liar")  # the least over-claiming donor first
    assert not catchup.acceptable_round(199, 10, p) and catchup.acceptable_round(36, 10, p)
    assert catchup.plan(34, 2, {"honest": 35, "liar": 10**6}) is None  # the confirmed mesh is not ahead


def test_catch_up_needs_confirmation_that_a_minority_of_liars_cannot_give():
    assert catchup.confirmations_needed(1) == 1  # two nodes: nobody else can confirm
    assert [catchup.confirmations_needed(n) for n in (2, 3, 5, 6, 9)] == [2, 2, 2, 3, 4]
    claims = {"h1": 20, "h2": 21, "h3": 19, "h4": 20, "l1": 10**6, "l2": 10**6}  # 2 liars of 6
    assert catchup.confirmed_round(claims) == 21  # the highest round an honest peer holds
    assert catchup.plan(5, 2, {"only": 9}).donors == ("only",)


def test_blacklisted_donors_are_not_asked():
    assert catchup.plan(1, 2, {"a": 9, "b": 9}, {"a"}).donors == ("b",)
    assert catchup.plan(1, 2, {"a": 9, "b": 9}, {"a", "b"}) is None


# ------------------------------------------------------------------ 3. robust aggregation

def honest(seed: int, n: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.ones(n) + 0.01 * torch.randn(n, generator=g), "b": torch.full((4,), 0.5)}


@pytest.mark.parametrize("method", ["median", "trimmed-mean", "norm-clip"])
def test_robust_methods_bound_one_attacker_among_four(method):
    own, peers = honest(0), [honest(1), honest(2)]
    attacker = {k: -1e4 * v for k, v in own.items()}
    clean = agg.aggregate(method, [(own, 1.0), *[(p, 1.0) for p in peers]])
    poisoned = agg.aggregate(method, [(own, 1.0), *[(p, 1.0) for p in peers], (attacker, 1.0)])
    mean = agg.aggregate("mean", [(own, 1.0), *[(p, 1.0) for p in peers], (attacker, 1.0)])
    gap = agg.update_norm(poisoned, minus=clean)
    assert gap < 0.05 * agg.update_norm(clean), (method, gap)
    assert agg.update_norm(mean, minus=clean) > 100 * agg.update_norm(clean)  # the plain mean is not robust


def test_median_and_trimmed_mean_are_per_coordinate_over_the_holders_of_a_nested_prefix():
    own = {"w": torch.tensor([1.0, 2.0, 3.0])}
    small = {"w": torch.tensor([9.0])}  # a lower level: holds the first coordinate only
    other = {"w": torch.tensor([2.0, 4.0, 3.0])}
    assert agg.median([(own, 1), (small, 1), (other, 1)])["w"].tolist() == [2.0, 3.0, 3.0]
    assert agg.trimmed_mean([(own, 1), (small, 1), (other, 1)])["w"].tolist() == [2.0, 3.0, 3.0]
    assert agg.median([(own, 1), (other, 1)])["w"].tolist() == [1.5, 3.0, 3.0]  # even count: the middle two
    assert agg.trim_count(3) == 1 and agg.trim_count(2) == 0 and agg.trim_count(10) == 2
    assert agg.median([(own, 1)])["w"].dtype == torch.float32


@pytest.mark.parametrize("big,tiny", [(1e300, 1.0), (1.0, 1e-300), (1e300, 1e-300)])
def test_fedavg_never_divides_by_zero_or_overflows_whatever_the_weights(big, tiny):
    a, b = {"w": torch.ones(3)}, {"w": torch.zeros(5)}  # different shapes: per-coordinate weight sums
    out = agg.fedavg([(a, tiny), (b, big)])["w"]
    assert bool(torch.isfinite(out).all())
    same = agg.fedavg([({"w": torch.ones(3)}, tiny), ({"w": torch.zeros(3)}, big)])["w"]
    assert bool(torch.isfinite(same).all())


def test_screen_refuses_sign_flipped_scaled_and_non_finite_states_and_keeps_honest_ones():
    start = honest(0)
    own, peer = moved(start, 1), moved(start, 2)  # both trained one round from the same merged state
    limit = agg.distance_limit(own, start, [peer])
    agg.screen(own, peer, distance_limit=limit)
    for bad, reason in [({k: -v for k, v in own.items()}, Reason.MALFORMED),
                        ({k: 9.9e5 / agg.update_norm(own) * -v for k, v in own.items()}, Reason.MALFORMED),
                        ({k: own[k] - 10 * (own[k] - start[k]) for k in own}, Reason.MALFORMED),  # delta x -10
                        ({"w": torch.full((64,), math.nan), "b": own["b"]}, Reason.NOT_FINITE)]:
        with pytest.raises(ProtocolError) as err:
            agg.screen(own, bad, distance_limit=limit)
        assert err.value.reason == reason


def moved(state: dict[str, torch.Tensor], seed: int, step: float = 0.05) -> dict[str, torch.Tensor]:
    """`state` after one round of training: every coordinate moved by about `step`."""
    g = torch.Generator().manual_seed(100 + seed)
    return {k: v + step * torch.randn(v.shape, generator=g) for k, v in state.items()}


def test_the_distance_limit_follows_one_rounds_drift_not_the_states_norm():
    """A small embedding moves farther than its init norm in a round: a norm-relative bound refused
    every honest update of it (prefix level 0 never merged in the long benchmark)."""
    start = {"embed": 0.02 * torch.randn(512, 16, generator=torch.Generator().manual_seed(0))}
    own, peers = moved(start, 1), [moved(start, 2), moved(start, 3)]
    assert agg.update_norm(peers[0], own, minus=own) > agg.update_norm(own)  # farther than its norm ...
    limit = agg.distance_limit(own, start, peers)
    for peer in peers:
        agg.screen(own, peer, distance_limit=limit)  # ... and still honest: merged
    replaced = {k: own[k] - 10 * (own[k] - start[k]) for k in own}  # model replacement (a few x: aggregation's job)
    with pytest.raises(ProtocolError):
        agg.screen(own, replaced, distance_limit=agg.distance_limit(own, start, [*peers, replaced]))


def test_the_distance_limit_is_robust_to_one_far_peer_and_lets_a_drifted_node_merge_back():
    start = honest(0)
    own = moved(start, 1)
    near = [moved(start, 2), moved(start, 3)]
    far = {k: v * 1e3 for k, v in own.items()}
    assert agg.distance_limit(own, start, [*near, far]) == pytest.approx(agg.distance_limit(own, start, near), rel=0.5)
    assert agg.distance_limit(own, start, [near[0], far]) < agg.update_norm(far, own, minus=own)  # 2: lower median
    # after a partition our state is far from every peer's: the peers' own spread is the scale
    drifted = [moved(moved(start, 7, 0.5), s) for s in (4, 5)]
    limit = agg.distance_limit(own, start, drifted)
    for peer in drifted:
        agg.screen(own, peer, distance_limit=limit)
    assert agg.distance_limit(own, None, near) is None  # no start known: no distance check
    nan_peer = {k: torch.full_like(v, math.nan) for k, v in own.items()}
    assert math.isfinite(agg.distance_limit(own, start, [near[0], nan_peer, near[1]]))


def config(tmp_path: Path, **learning):
    return parse_config(tomllib.loads(to_toml({"node": {"name": "a", "data_dir": str(tmp_path / "a"),
                                                        "listen": "mem:1"},
                                               "learning": {"weighting": "data-size", **learning}})), tmp_path)


def test_header_weights_are_clipped_to_one_round_and_never_above_the_receivers_own(tmp_path):
    cfg = config(tmp_path)
    cap = round_weight_cap(cfg)
    assert cap == cfg.train.steps_per_round * cfg.train.batch_size * cfg.data.seq_len
    out = clip_weights(cfg, 1000.0, [Contribution("x", {}, 1e30), Contribution("y", {}, 10.0),
                                     Contribution("z", {}, math.nan)])
    assert [c.weight for c in out] == [1000.0, 10.0, 1.0]
    assert clip_weights(cfg, 1e30, [Contribution("x", {}, 1e30)])[0].weight == cap


def test_a_1e30_weight_does_not_make_the_merge_the_attackers_tensors(tmp_path):
    cfg = config(tmp_path)
    own = {"w": torch.zeros(4)}
    merged = weighted_merge(cfg, "a", own, 100.0, [Contribution("evil", {"w": torch.ones(4)}, 1e30)], {}, None)
    assert merged["w"].tolist() == [0.5] * 4  # clipped to the receiver's own weight: one vote of two


def test_weighted_merge_routes_the_configured_aggregation(tmp_path):
    own = {"w": torch.tensor([1.0])}
    peers = [Contribution("p", {"w": torch.tensor([2.0])}, 1.0), Contribution("q", {"w": torch.tensor([100.0])}, 1.0)]
    assert weighted_merge(config(tmp_path, aggregation="median"), "a", own, 1.0, peers, {}, None)["w"].item() == 2.0
    assert weighted_merge(config(tmp_path, aggregation="mean"), "a", own, 1.0, peers, {}, None)["w"].item() > 30


def test_a_non_finite_merge_is_refused_with_the_peers_named(tmp_path):
    own = {"w": torch.tensor([math.inf])}
    with pytest.raises(MergeRefused) as err:
        weighted_merge(config(tmp_path), "a", own, 1.0, [Contribution("p", {"w": torch.tensor([1.0])}, 1.0)], {}, None)
    assert err.value.reason == Reason.NOT_FINITE and err.value.peers == ["p"]


# ------------------------------------------------------------------ 4. no agreement without proof

def test_an_agreement_is_proven_only_by_a_quorum_of_live_signers():
    from fednode.mesh import negotiation as neg

    zero = neg.Agreement.genesis()
    a = neg.Agreement(epoch=1, level=1, previous_level=0, activate_round=5, proposer="p",
                      growth_seed=neg.growth_seed(1, 1))
    lie = neg.Agreement(epoch=1000, level=3, previous_level=0, activate_round=2, proposer="x",
                        growth_seed=neg.growth_seed(1000, 3))
    live = ["me", "p", "q", "x", "y", "z"]  # 5 live others: a quorum (2/3) of them is 4
    got = neg.proven_agreement(zero, {"p": a, "q": a, "y": a, "x": lie}, live, 2 / 3, self_id="me")
    assert got.agreement is None and {n for n, _ in got.unproven} == {"p", "q", "x", "y"}
    ack = neg.Proposal(epoch=1, level=1, activate_round=5, proposer="p", growth_seed=a.growth_seed,
                       direction=neg.Direction.GROW)
    got = neg.proven_agreement(zero, {"p": a, "q": a, "y": a, "x": lie}, live, 2 / 3, own_ack=ack, self_id="me")
    assert got.agreement == a and got.unproven == (("x", lie),)  # our own ack: 4 votes of 6
    live = ["me", "p", "q", "x", "y"]  # 4 live others: a quorum (2/3) of them is 3
    dead = neg.proven_agreement(zero, {"p": a, "q": a, "z": a}, live, 2 / 3, self_id="me")
    assert dead.agreement is None  # z is not live: its signature does not count, p and q are 2 of 4
    three = neg.proven_agreement(zero, {"p": a, "q": a, "x": a}, live, 2 / 3, self_id="me")
    assert three.agreement == a and three.unproven == ()
    liar = neg.proven_agreement(zero, {"x": lie}, ["me", "p", "q", "x"], 2 / 3, self_id="me")
    assert liar.agreement is None  # one liar of 3 others is below their quorum (2)


def test_a_node_away_while_the_mesh_agreed_adopts_what_its_honest_peers_prove():
    """A member silent on the agreement (an insider, or one that never acks) must not keep a node
    that was away (paused, partitioned) out of it: we are no vote when we did not ack. In CI the
    returning node stayed at epoch 0 / level 0 for good while 2 honest of 4 live claimed epoch 1,
    then refused every honest update as too far."""
    from fednode.mesh import negotiation as neg

    zero = neg.Agreement.genesis()
    a = neg.Agreement(epoch=1, level=1, previous_level=0, activate_round=5, proposer="p",
                      growth_seed=neg.growth_seed(1, 1))
    got = neg.proven_agreement(zero, {"p": a, "q": a}, ["me", "p", "q", "mallory"], 2 / 3, self_id="me")
    assert got.agreement == a  # 2 of the 3 others: their quorum
    pair = neg.proven_agreement(zero, {"p": a}, ["me", "p"], 2 / 3, self_id="me")
    assert pair.agreement == a  # a two-node mesh: the one peer that grew while we were away
    other = neg.Proposal(epoch=1, level=2, activate_round=5, proposer="p", growth_seed=neg.growth_seed(1, 2),
                         direction=neg.Direction.GROW)
    acked_else = neg.proven_agreement(zero, {"p": a}, ["me", "p", "q"], 2 / 3, own_ack=other, self_id="me",
                                      peer_acks={"q": other})
    assert acked_else.agreement is None  # 1 of the 2 others: our ack of another proposal is no vote for it


def test_peers_acks_prove_the_proposers_commit_before_anyone_else_commits():
    """The proposer's commit is heard first: the acks in the others' signed records are the proof,
    or every acker waits for the others to commit (a mesh that never grew, seen in CI)."""
    from fednode.mesh import negotiation as neg

    zero = neg.Agreement.genesis()
    a = neg.Agreement(epoch=1, level=1, previous_level=0, activate_round=5, proposer="p",
                      growth_seed=neg.growth_seed(1, 1))
    ack = neg.Proposal(epoch=1, level=1, activate_round=5, proposer="p", growth_seed=a.growth_seed,
                       direction=neg.Direction.GROW)
    other = neg.Proposal(epoch=1, level=2, activate_round=5, proposer="p", growth_seed=neg.growth_seed(1, 2),
                         direction=neg.Direction.GROW)
    live = ["me", "p", "q", "x", "y"]  # a quorum (2/3) of the 4 others is 3
    got = neg.proven_agreement(zero, {"p": a}, live, 2 / 3, self_id="me", peer_acks={"q": ack, "x": ack})
    assert got.agreement == a  # p's commit + q's and x's acks
    got = neg.proven_agreement(zero, {"p": a}, live[:4], 2 / 3, own_ack=ack, self_id="me", peer_acks={"q": ack})
    assert got.agreement == a  # ... or, of 3 others and us, ours and q's
    alone = neg.proven_agreement(zero, {"p": a}, live, 2 / 3, self_id="me", peer_acks={"q": ack, "x": other})
    assert alone.agreement is None and alone.unproven == (("p", a),)  # an ack of another proposal is no vote
    dead = neg.proven_agreement(zero, {"p": a}, live, 2 / 3, self_id="me", peer_acks={"q": ack, "z": ack})
    assert dead.agreement is None  # z is not live
    twice = neg.proven_agreement(zero, {"p": a, "q": a}, live, 2 / 3, self_id="me", peer_acks={"q": ack})
    assert twice.agreement is None  # q's commit and q's ack are one member, one vote


def test_a_node_ahead_of_the_confirmed_mesh_does_not_race_on_alone():
    """A node that stopped waiting for its peers (each missed 3 rounds while it was out of step)
    closed every round at once and ran hundreds of rounds ahead, never to merge again: a round
    beyond the confirmed mesh's next one waits instead (one liar's high claim cannot hide it)."""
    claims = {"a": 20, "b": 20, "c": 19}
    assert not catchup.ahead_of_mesh(21, claims)  # in step: the mesh works on round 21
    assert catchup.ahead_of_mesh(22, claims) and catchup.ahead_of_mesh(300, claims)
    assert catchup.ahead_of_mesh(22, {**claims, "liar": 10**6})  # the confirmed round is still 20
    assert not catchup.ahead_of_mesh(5, {})  # alone: nobody to wait for


def test_a_state_newer_than_planned_is_taken_once_signed_peers_confirm_it():
    """With fast rounds an honest donor's state is a few rounds past the plan (our view of the mesh's
    signed rounds is a gossip old): refusing it blacklisted every honest donor and left the lagger
    racing alone. Fresh claims confirm it; a liar's label stays unconfirmed."""
    p = catchup.plan(30, 2, {"a": 42, "b": 42, "c": 41})
    assert p is not None and not catchup.acceptable_round(46, 30, p)
    assert not catchup.confirms(46, {"a": 42, "b": 42, "c": 41}, p)
    assert catchup.confirms(46, {"a": 46, "b": 45, "c": 44}, p)  # a gossip later
    assert not catchup.confirms(10**6, {"a": 46, "b": 45, "c": 44, "liar": 10**6}, p)


def test_a_node_that_heard_an_agreement_after_its_activation_re_syncs():
    assert catchup.missed_activation(activate_round=40, level=1, trained_level=0, committed_round=45)
    assert catchup.missed_activation(activate_round=45, level=1, trained_level=0, committed_round=45)
    assert not catchup.missed_activation(activate_round=46, level=1, trained_level=0, committed_round=45)
    assert not catchup.missed_activation(activate_round=40, level=1, trained_level=1, committed_round=45)


def test_a_node_refused_far_round_after_round_by_its_only_pusher_counts_towards_a_re_sync():
    streak = 0
    for _ in range(catchup.ISOLATED_ROUNDS):
        streak = catchup.next_far_streak(streak, refused_far=True, merged=False)
    assert streak == catchup.ISOLATED_ROUNDS
    assert catchup.next_far_streak(streak, refused_far=False, merged=False) == streak  # a quiet round
    assert catchup.next_far_streak(streak, refused_far=True, merged=True) == 0  # merged: in step


def test_a_node_whose_peers_are_all_too_far_is_the_one_that_diverged():
    """A node that raced alone refused every honest state as too far, and they refused its own, for
    hundreds of rounds: several distinct peers all far (no merge since) means re-sync; one far peer
    (an insider, or fanout 1) cannot tell who is off, and old refusals age out."""
    assert not catchup.diverged({"a": 10}, 10, 2)
    assert catchup.diverged({"a": 9, "b": 10}, 10, 2)
    assert not catchup.diverged({"a": 5, "b": 10}, 10, 2)  # a's refusal is out of the window
    assert not catchup.diverged({"a": 9, "b": 10}, 10, 7)  # 7 peers: a catch-up needs 3 to confirm
    assert catchup.diverged({"a": 9, "b": 10, "c": 10}, 10, 7)
    p = catchup.plan(20, 0, {"a": 20, "b": 20})
    assert p is not None and catchup.acceptable_round(20, 20, p, resync=True)  # in step: same round
    assert not catchup.acceptable_round(20, 20, p) and not catchup.acceptable_round(19, 20, p, resync=True)
