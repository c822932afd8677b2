"""Capacity negotiation: the pure decision function, validation of peer input, merges, invariants."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.errors import ConfigError, FednodeError
from fednode.mesh import negotiation as neg
from fednode.mesh.negotiation import (
    Ack,
    AckProposal,
    Agreement,
    Commit,
    Direction,
    Hold,
    MeshView,
    NegotiationError,
    NoChange,
    Outcome,
    Params,
    PeerView,
    Proposal,
    Propose,
    Refusal,
    RefusedProposal,
    ceiling_from_budget,
    decide,
    effective_level,
    growth_seed,
    level_in_force,
    negotiate,
    plateaued,
    proposer_for,
    quorum_count,
    quorum_level,
    reconcile,
    validate_ack,
    validate_proposal,
)

P = Params(max_level=4, plateau_window=3, plateau_theta=0.01, js_threshold=0.1, activation_delay=2,
           slow_rounds=2, min_round_gap=3, min_live_peers=1, growth_signal="plateau")  # the signals' rules
GENESIS = Agreement.genesis()
FLAT = (2.0, 2.0, 2.0, 2.0)
IMPROVING = (3.0, 2.5, 2.0, 1.5)
ROUND = 10


def peers_of(ceilings: dict[str, int], *, dead: set[str] = frozenset(), streaks: dict[str, int] | None = None,
             ) -> tuple[PeerView, ...]:
    streaks = streaks or {}
    return tuple(PeerView(nid, c, live=nid not in dead, over_budget_streak=streaks.get(nid, 0))
                 for nid, c in ceilings.items())


def view_of(ceilings: dict[str, int], *, self_id: str | None = None, dead: set[str] = frozenset(),
            streaks: dict[str, int] | None = None, committed: Agreement = GENESIS, round_: int = ROUND,
            losses: tuple[float, ...] = FLAT, js: float | None = 0.5, open_: Proposal | None = None,
            acks: frozenset[Ack] = frozenset()) -> MeshView:
    """A view; `self_id` defaults to the proposer of the next epoch among the live peers."""
    live = sorted(set(ceilings) - set(dead))
    self_id = self_id or proposer_for(committed.epoch + 1, live)
    return MeshView(self_id=self_id, current_round=round_, committed=committed,
                    peers=peers_of(ceilings, dead=dead, streaks=streaks), mesh_losses=losses, js_divergence=js,
                    open_proposal=open_, acks=acks)


def non_proposer(view: MeshView) -> str:
    want = proposer_for(view.committed.epoch + 1, view.live_ids())
    return next(nid for nid in view.live_ids() if nid != want)


def agreement(epoch: int, level: int, *, previous: int | None = None, activate: int = 0,
              proposer: str = "a") -> Agreement:
    return Agreement(epoch=epoch, level=level, previous_level=level if previous is None else previous,
                     activate_round=activate, proposer=proposer, growth_seed=growth_seed(epoch, level))


def proposal(epoch: int, level: int, proposer: str, activate: int, direction: Direction = Direction.GROW,
             seed: int | None = None) -> Proposal:
    return Proposal(epoch=epoch, level=level, activate_round=activate, proposer=proposer,
                    growth_seed=growth_seed(epoch, level) if seed is None else seed, direction=direction)


def refusal_of(fn, *args) -> Refusal:
    with pytest.raises(NegotiationError) as info:
        fn(*args)
    assert isinstance(info.value, FednodeError)
    return info.value.refusal


THREE = {"a": 3, "b": 3, "c": 3}


# ---- building blocks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("losses, window, theta, want", [
    (FLAT, 3, 0.01, True),
    (IMPROVING, 3, 0.01, False),
    ((1.0, 1.0, 1.0), 3, 0.01, False),  # needs window + 1 points
    ((), 1, 0.01, False),
    ((1.0, 0.75), 1, 0.25, False),  # relative drop exactly theta: not plateaued (strict)
    ((1.0, 0.76), 1, 0.25, True),  # just under theta
    ((1.0, 1.5), 1, 0.01, True),  # rising: not improving
    ((5.0, 1.0, 1.0, 1.0, 1.0), 3, 0.01, True),  # only the last window counts
    ((5.0, 1.0, 1.0, 1.0, 1.0), 4, 0.01, False),
    ((1.0, float("nan")), 1, 0.01, False),  # garbage never triggers growth
    ((float("inf"), 1.0), 1, 0.01, False),
    ((0.0, 0.0), 1, 0.01, True),
    ((2.0, 2.0), 0, 0.01, False),
])
def test_plateaued(losses, window, theta, want):
    assert plateaued(losses, window, theta) is want


@pytest.mark.parametrize("n, q, want", [
    (0, 2 / 3, 0), (1, 2 / 3, 1), (2, 2 / 3, 2), (3, 2 / 3, 2), (4, 2 / 3, 3), (6, 2 / 3, 4), (7, 2 / 3, 5),
    (9, 2 / 3, 6), (3, 0.5, 2), (4, 0.5, 2), (1, 0.5, 1), (3, 1.0, 3), (4, 0.75, 3),
])
def test_quorum_count_is_exact(n, q, want):
    assert quorum_count(n, q) == want


@pytest.mark.parametrize("ceilings, dead, want", [
    ({"a": 3, "b": 1, "c": 1}, set(), 1),  # only 1 of 3 affords 3
    ({"a": 3, "b": 3, "c": 1}, set(), 3),  # exactly 2/3 afford 3
    ({"a": 3, "b": 2, "c": 1}, set(), 2),
    ({"a": 3, "b": 3, "c": 1}, {"b"}, 1),  # dead peers do not count
    ({"a": 3}, set(), 3),
    ({"a": -5, "b": -1, "c": 0}, set(), 0),  # level 0 is the floor
    ({"a": 3, "b": 3}, {"a", "b"}, 0),
])
def test_quorum_level(ceilings, dead, want):
    assert quorum_level(peers_of(ceilings, dead=dead), 2 / 3) == want


def test_proposer_is_deterministic_and_order_free():
    ids = [f"site-{i}" for i in range(7)]
    for epoch in range(20):
        want = proposer_for(epoch, ids)
        assert want in ids
        assert proposer_for(epoch, reversed(ids)) == want
        assert proposer_for(epoch, set(ids) | {want}) == want
    assert len({proposer_for(e, ids) for e in range(40)}) > 1, "the proposer rotates over epochs"
    assert proposer_for(1, []) is None


def test_proposer_hash_tie_breaks_on_id(monkeypatch):
    monkeypatch.setattr(neg, "_digest", lambda text: b"\x00" * 32)
    assert proposer_for(3, ["zed", "amy"]) == "amy"
    assert proposer_for(3, ["amy", "zed"]) == "amy"


def test_growth_seed_depends_on_epoch_and_level_only():
    assert growth_seed(4, 2) == growth_seed(4, 2)
    assert len({growth_seed(e, lv) for e in range(5) for lv in range(5)}) == 25
    assert all(0 <= growth_seed(e, 1) < 2**63 for e in range(50))


@pytest.mark.parametrize("steps, mems, want", [
    ({0: 0.1, 1: 0.2, 2: 0.4, 3: 0.9}, {0: 1, 1: 2, 2: 4, 3: 8}, 2),  # time budget 0.5
    ({0: 0.1, 1: 0.2, 2: 0.4}, {0: 1, 1: 2, 2: 40}, 1),  # memory budget 10
    ({0: 0.1, 1: 0.6, 2: 0.4}, {0: 1, 1: 2, 2: 4}, 0),  # contiguous: a fit above a misfit is noise
    ({0: 0.1, 2: 0.2}, {0: 1, 2: 2}, 0),  # level 1 never measured
    ({0: 0.1, 1: 0.2}, {0: 1}, 0),  # level 1 memory not measured
    ({0: 9.0}, {0: 1}, 0),  # nothing fits: level 0, everyone trains it
    ({}, {}, 0),
    ({0: 0.1, 1: float("nan")}, {0: 1, 1: 1}, 0),
    ({0: 0.1, 1: 0.5}, {0: 1, 1: 10}, 1),  # at the budget fits
])
def test_ceiling_from_budget(steps, mems, want):
    assert ceiling_from_budget(steps, mems, time_budget_s=0.5, memory_budget_bytes=10) == want


def test_level_in_force_switches_at_activation():
    a = agreement(3, 2, previous=1, activate=12)
    assert [level_in_force(a, r) for r in (0, 11, 12, 13)] == [1, 1, 2, 2]
    assert effective_level(a, 5) == 2
    assert effective_level(a, 5, round_=11) == 1
    assert effective_level(a, 0, round_=13) == 0  # a low peer trains its own slice, it is not excluded
    assert effective_level(a, -3) == 0


def test_params_are_checked():
    for bad in ({"quorum": 0.5}, {"quorum": 1.2}, {"activation_delay": 0}, {"max_level": -1},
                {"plateau_window": 0}, {"slow_fraction": 0}, {"min_live_peers": 0}, {"slow_rounds": 0}):
        with pytest.raises(ConfigError):
            Params(**({"max_level": 4} | bad))


def test_mesh_view_refuses_a_duplicate_id():
    with pytest.raises(ValueError):
        MeshView("a", 0, GENESIS, (PeerView("a", 1), PeerView("a", 2)))


def test_capacity_is_tied_to_resources_not_to_a_peers_data():
    assert {f.name for f in fields(PeerView)} == {"node_id", "ceiling", "live", "over_budget_streak"}
    # heterogeneity only gates growth: above the threshold its value never changes what is proposed
    proposals = {decide(view_of(THREE, js=js), P) for js in (0.1, 0.3, 0.99, 5.0)}
    assert len(proposals) == 1


# ---- decide: growth -------------------------------------------------------------------------------------------


def test_grow_when_all_conditions_hold_and_only_the_proposer_proposes():
    view = view_of(THREE)
    d = decide(view, P)
    assert isinstance(d, Propose) and d.reason == "grow"
    p = d.proposal
    assert (p.epoch, p.level, p.proposer, p.activate_round, p.direction) == (1, 1, view.self_id, 12, Direction.GROW)
    assert p.growth_seed == growth_seed(1, 1)
    validate_proposal(p, view, P)  # its own proposal passes the checks the others run
    for other in set(THREE) - {view.self_id}:
        assert decide(replace(view, self_id=other), P) == NoChange(Hold.AWAITING_PROPOSER, "grow to 1")


@pytest.mark.parametrize("kwargs, hold", [
    ({"losses": IMPROVING}, Hold.NOT_PLATEAUED),
    ({"losses": FLAT[:3]}, Hold.NOT_PLATEAUED),
    ({"ceilings": {"a": 3, "b": 0, "c": 0}}, Hold.NO_QUORUM),  # 1 of 3 can afford the next level
    ({"ceilings": {"a": 3, "b": 3, "c": 0}, "dead": {"b"}}, Hold.NO_QUORUM),
    ({"js": 0.05}, Hold.LOW_HETEROGENEITY),
    ({"js": None}, Hold.NO_HETEROGENEITY_SIGNAL),
    ({"js": float("nan")}, Hold.NO_HETEROGENEITY_SIGNAL),
    ({"committed": agreement(4, 4), "ceilings": {"a": 4, "b": 4, "c": 4}}, Hold.AT_MAX_LEVEL),
    ({"committed": agreement(1, 1, previous=0, activate=8)}, Hold.COOLDOWN),  # round 10 < 8 + 3
])
def test_no_growth(kwargs, hold):
    kwargs = {"ceilings": THREE} | kwargs
    d = decide(view_of(**kwargs), P)
    assert isinstance(d, NoChange) and d.reason == hold, d


def test_the_budget_signal_grows_whenever_afforded_and_keeps_every_other_gate():
    """shared-prefix's signal: P's own loss improves as long as it trains, so no plateau is awaited."""
    budget = replace(P, growth_signal="budget")
    for losses in (IMPROVING, FLAT[:3], ()):
        d = decide(view_of(THREE, losses=losses), budget)
        assert isinstance(d, Propose) and d.proposal.level == 1, d
    assert decide(view_of(THREE, losses=IMPROVING), P) == NoChange(Hold.NOT_PLATEAUED)
    for kwargs, hold in [({"ceilings": {"a": 3, "b": 0, "c": 0}}, Hold.NO_QUORUM),
                         ({"js": 0.05}, Hold.LOW_HETEROGENEITY),
                         ({"committed": agreement(1, 1, previous=0, activate=8)}, Hold.COOLDOWN)]:
        d = decide(view_of(**({"ceilings": THREE, "losses": IMPROVING} | kwargs)), budget)
        assert isinstance(d, NoChange) and d.reason == hold, d
    with pytest.raises(ConfigError):
        Params(max_level=4, growth_signal="sometimes")


@pytest.mark.parametrize("kwargs", [
    {"ceilings": {"a": 1, "b": 1, "c": 0}},  # exactly 2/3 can afford level 1
    {"ceilings": {"a": 1, "b": 1, "c": 1, "d": 0, "e": 0, "f": 0}, "dead": {"d", "e"}},  # 3 of 4 live
    {"js": 0.1},  # at the threshold
    {"committed": agreement(1, 1, previous=0, activate=7)},  # cooldown over at round 10 = 7 + 3
    {"committed": agreement(0, 0, activate=0), "round_": 0},  # no cooldown at genesis
])
def test_growth_at_the_boundaries(kwargs):
    kwargs = {"ceilings": THREE} | kwargs
    view = view_of(**kwargs)
    d = decide(view, P)
    assert isinstance(d, Propose) and d.proposal.direction == Direction.GROW, d
    assert d.proposal.level == view.committed.level + 1
    validate_proposal(d.proposal, view, P)


def test_liar_cannot_raise_the_level_and_gets_no_more_than_the_slice():
    honest = {"a": 1, "b": 1, "c": 1}
    ceilings = honest | {"liar": 10**6}
    current = agreement(1, 1, previous=0, activate=0)
    assert quorum_level(peers_of(ceilings), 2 / 3) == 1  # 3 of 4 needed; only the liar affords 2
    for self_id in ceilings:
        d = decide(view_of(ceilings, self_id=self_id, committed=current), P)
        assert not isinstance(d, Propose | Commit), d
    assert effective_level(current, 10**6) == 1  # the liar trains the committed slice, no more
    low = agreement(2, 3, previous=2, activate=0)
    assert effective_level(low, 1) == 1  # an honest low-ceiling peer trains exactly its ceiling


def test_one_liar_is_one_vote():
    # the liar may tip the quorum only where one more vote is missing among honest peers
    assert quorum_level(peers_of({"a": 3, "b": 1, "liar": 99}), 2 / 3) == 3  # 2 of 3 claim >= 3
    assert quorum_level(peers_of({"a": 3, "b": 1, "c": 1, "liar": 99}), 2 / 3) == 1  # 3 of 4 needed


# ---- decide: shrinking ----------------------------------------------------------------------------------------


LEVEL2 = agreement(2, 2, previous=1, activate=5)


@pytest.mark.parametrize("kwargs, want", [
    ({"streaks": {"a": 2, "b": 2}}, 1),  # 2 of 3 slow for k rounds
    ({"streaks": {"a": 5, "b": 2, "c": 9}}, 1),
    ({"ceilings": {"a": 3, "b": 2, "c": 2, "d": 0}, "dead": {"b", "c"}}, 0),  # churn: straight to what a quorum affords
    ({"ceilings": {"a": 3, "b": 1, "c": 1}}, 1),  # re-measured ceilings fell
    ({"ceilings": {"a": 3, "b": 1, "c": 1}, "streaks": {"a": 2, "b": 2}}, 1),
])
def test_shrink(kwargs, want):
    kwargs = {"ceilings": THREE, "committed": LEVEL2} | kwargs
    view = view_of(**kwargs)
    d = decide(view, P)
    assert isinstance(d, Propose) and d.reason == "shrink", d
    assert d.proposal.level == want and d.proposal.epoch == 3
    validate_proposal(d.proposal, view, P)


@pytest.mark.parametrize("kwargs, hold", [
    ({"streaks": {"a": 2}}, Hold.NOT_PLATEAUED),  # 1 of 3 slow: no shrink (and no growth either here)
    ({"streaks": {"a": 1, "b": 1, "c": 1}}, Hold.NOT_PLATEAUED),  # streaks shorter than k
    ({"streaks": {"a": 2, "b": 2}, "round_": 6}, Hold.COOLDOWN),  # the streak predates the level in force
    ({"streaks": {"a": 2, "b": 2}, "committed": agreement(2, 0)}, Hold.AT_MIN_LEVEL),
])
def test_no_shrink(kwargs, hold):
    kwargs = {"ceilings": THREE, "committed": LEVEL2, "losses": IMPROVING} | kwargs
    d = decide(view_of(**kwargs), P)
    assert isinstance(d, NoChange) and d.reason == hold, d


def test_shrink_waits_for_the_proposer_and_has_no_cooldown():
    view = view_of({"a": 1, "b": 1, "c": 3}, committed=replace(LEVEL2, activate_round=9))
    assert isinstance(decide(view, P), Propose)
    other = replace(view, self_id=non_proposer(view))
    assert decide(other, P) == NoChange(Hold.AWAITING_PROPOSER, "shrink to 1")


def test_shrink_before_the_last_change_activates_keeps_activations_ordered():
    pending_growth = agreement(2, 2, previous=1, activate=13)  # committed at round 10, not yet in force
    view = view_of({"a": 1, "b": 1, "c": 3}, committed=pending_growth)
    p = decide(view, P).proposal
    assert p.activate_round == 15 > pending_growth.activate_round
    validate_proposal(p, view, P)


def test_self_not_live_and_too_few_live_peers_change_nothing():
    view = view_of(THREE)
    me = view.self_id
    assert decide(view_of(THREE, self_id=me, dead={me}), P) == NoChange(Hold.SELF_NOT_LIVE)
    assert decide(replace(view, self_id="stranger"), P) == NoChange(Hold.SELF_NOT_LIVE)
    alone = view_of({"a": 3, "b": 3, "c": 3}, self_id="a", dead={"b", "c"})
    assert isinstance(decide(alone, P), Propose)  # the default: a lone live peer is a quorum of one
    assert decide(alone, replace(P, min_live_peers=2)).reason == Hold.TOO_FEW_LIVE


# ---- a small synchronous mesh: proposals, acks, commits, partitions -----------------------------------------


@dataclass
class Node:
    committed: Agreement
    open: Proposal | None = None
    acks: frozenset[Ack] = frozenset()


@dataclass
class Sim:
    """Every node decides on its own view; messages reach the nodes of the sender's group only."""

    ceilings: dict[str, int]
    params: Params = P
    round_: int = ROUND
    losses: tuple[float, ...] = FLAT
    js: float = 0.5
    nodes: dict[str, Node] = field(default_factory=dict)
    refused: Counter = field(default_factory=Counter)
    log: list[tuple[str, object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.nodes = self.nodes or {nid: Node(GENESIS) for nid in self.ceilings}

    def view(self, nid: str, group: set[str]) -> MeshView:
        n = self.nodes[nid]
        peers = tuple(PeerView(p, c, live=p in group) for p, c in self.ceilings.items())
        return MeshView(nid, self.round_, n.committed, peers, self.losses, self.js, n.open, n.acks)

    def deliver_proposal(self, to: str, p: Proposal, group: set[str]) -> None:
        try:
            validate_proposal(p, self.view(to, group), self.params)
        except NegotiationError as err:
            self.refused[err.refusal] += 1
            return
        node = self.nodes[to]
        if node.open != p:
            node.open, node.acks = p, frozenset()

    def deliver_ack(self, to: str, ack: Ack, sender: str, group: set[str]) -> None:
        try:
            validate_ack(ack, self.view(to, group), sender)
        except NegotiationError as err:
            self.refused[err.refusal] += 1
            return
        self.nodes[to].acks |= {ack}

    def adopt(self, nid: str, incoming: Agreement) -> None:
        node = self.nodes[nid]
        node.committed = reconcile(node.committed, incoming)
        if node.open is not None and node.open.epoch <= node.committed.epoch:
            node.open, node.acks = None, frozenset()

    def step(self, group: set[str]) -> dict[str, object]:
        decisions = {nid: decide(self.view(nid, group), self.params) for nid in sorted(group)}
        for nid, d in decisions.items():
            self.log.append((nid, d))
            if isinstance(d, Propose):
                for to in sorted(group):
                    self.deliver_proposal(to, d.proposal, group)
            elif isinstance(d, AckProposal):
                for to in sorted(group):
                    self.deliver_ack(to, d.ack, nid, group)
            elif isinstance(d, Commit):
                self.adopt(nid, d.agreement)
        return decisions

    def run(self, group: set[str], steps: int = 5) -> None:
        for _ in range(steps):
            self.step(group)

    def committed(self, group) -> set[Agreement]:
        return {self.nodes[nid].committed for nid in group}


def test_proposer_proposes_others_ack_all_commit_the_same_agreement():
    sim = Sim({"a": 3, "b": 3, "c": 3, "d": 0})
    group = set(sim.ceilings)
    first = sim.step(group)
    proposer = proposer_for(1, group)
    assert [nid for nid, d in first.items() if isinstance(d, Propose)] == [proposer]
    second = sim.step(group)
    assert all(isinstance(d, AckProposal) for d in second.values()), second  # d (ceiling 0) acks too
    third = sim.step(group)
    assert all(isinstance(d, Commit) for d in third.values()), third
    (agreed,) = sim.committed(group)
    assert (agreed.epoch, agreed.level, agreed.previous_level, agreed.proposer) == (1, 1, 0, proposer)
    assert agreed.activate_round == ROUND + P.activation_delay
    assert level_in_force(agreed, ROUND + 1) == 0 and level_in_force(agreed, ROUND + 2) == 1
    assert effective_level(agreed, sim.ceilings["d"]) == 0  # d trains its own slice, and it is still in
    assert not sim.refused
    quiet = sim.step(group)  # nothing left to do inside the cooldown
    assert all(d == NoChange(Hold.COOLDOWN, "until round 15") for d in quiet.values()), quiet


def test_no_commit_without_a_quorum_of_acks():
    view = view_of(THREE)
    p = decide(view, P).proposal
    me = view.self_id
    acked_by_me = replace(view, open_proposal=p, acks=frozenset({Ack.of(p, me)}))
    assert decide(acked_by_me, P) == NoChange(Hold.WAITING_FOR_ACKS, "1 of 2")
    other = non_proposer(view)
    assert isinstance(decide(replace(acked_by_me, self_id=other), P), AckProposal)
    two = replace(acked_by_me, acks=acked_by_me.acks | {Ack.of(p, other)})
    assert isinstance(decide(two, P), Commit)
    expired = replace(two, current_round=p.activate_round)
    assert not isinstance(decide(expired, P), Commit)  # too late: the round would mix shapes


def test_acks_from_dead_or_for_another_proposal_do_not_count():
    view = view_of(THREE)
    p = decide(view, P).proposal
    others = sorted(set(THREE) - {view.self_id})
    wrong = replace(p, level=2)
    acks = frozenset({Ack.of(p, view.self_id), Ack.of(wrong, others[0]), Ack.of(p, "ghost")})
    d = decide(replace(view, open_proposal=p, acks=acks), P)
    assert d.reason == Hold.WAITING_FOR_ACKS
    dead_ack = view_of(THREE, self_id=view.self_id, dead={others[1]}, open_=p,
                       acks=frozenset({Ack.of(p, view.self_id), Ack.of(p, others[1])}))
    assert decide(dead_ack, P) == NoChange(Hold.WAITING_FOR_ACKS, "1 of 2")


def test_growth_no_longer_affordable_is_not_committed():
    view = view_of(THREE)
    p = decide(view, P).proposal
    acks = frozenset(Ack.of(p, nid) for nid in THREE)
    churned = view_of({"a": 3, "b": 0, "c": 0}, self_id=view.self_id, open_=p, acks=acks)
    d = decide(churned, P)
    assert d.reason == Hold.PROPOSAL_REFUSED and d.detail.startswith("BAD_LEVEL"), d


def test_an_open_proposal_blocks_until_it_expires_then_the_proposer_may_retry():
    view = view_of(THREE)
    p = decide(view, P).proposal
    other = non_proposer(view)
    blocked = view_of(THREE, self_id=other, open_=p, acks=frozenset({Ack.of(p, other)}))
    assert decide(blocked, P).reason == Hold.WAITING_FOR_ACKS
    retry_view = replace(view, open_proposal=p, current_round=p.activate_round)
    retry = decide(retry_view, P)
    assert isinstance(retry, Propose) and retry.proposal.epoch == p.epoch
    assert retry.proposal.activate_round > p.activate_round
    validate_proposal(retry.proposal, retry_view, P)  # the expired one does not conflict


def test_partition_halves_commit_and_reconcile_to_the_same_agreement():
    ceilings = {n: 4 for n in ("a", "b", "c", "d", "e", "f")}
    sim = Sim(ceilings)
    left, right = {"a", "b", "c"}, {"d", "e", "f"}
    sim.run(left)
    sim.run(right)
    (la,) = sim.committed(left)
    (ra,) = sim.committed(right)
    assert la.epoch == ra.epoch == 1 and la.level == ra.level == 1
    assert la.proposer != ra.proposer
    assert la.growth_seed == ra.growth_seed  # same (epoch, level): both halves grew identically
    assert reconcile(la, ra) == reconcile(ra, la)
    sim.round_ = 15  # after the cooldown the right half grows again
    sim.run(right)
    (ra2,) = sim.committed(right)
    assert (ra2.epoch, ra2.level, ra2.previous_level) == (2, 2, 1)
    assert sim.committed(left) == {la}
    # heal: every node adopts every agreement it hears, in any order
    heard = [la, ra, ra2]
    rng = random.Random(3)
    for nid in ceilings:
        rng.shuffle(heard)
        for a in heard:
            sim.adopt(nid, a)
    assert sim.committed(set(ceilings)) == {ra2}
    assert not sim.refused


def test_partition_with_different_levels_in_one_epoch_heals_to_the_higher_level():
    grown = agreement(5, 3, previous=2, activate=20, proposer="x")
    shrunk = agreement(5, 1, previous=2, activate=19, proposer="a")
    assert reconcile(grown, shrunk) == reconcile(shrunk, grown) == grown
    newer_shrink = agreement(6, 1, previous=3, activate=30, proposer="q")
    assert reconcile(grown, newer_shrink) == newer_shrink  # shrinking is a new epoch, and it wins
    twin = replace(grown, proposer="b")  # same epoch and level, another proposer: a fixed pick
    assert reconcile(grown, twin) == reconcile(twin, grown) == grown


# ---- negotiate: one pass, the decision with its diagnostics ---------------------------------------------------


def test_outcome_carries_the_capped_quorum_level_whatever_the_decision():
    rich = {"a": 9, "b": 9, "c": 2}  # a quorum affords 9, above max_level 4
    view = view_of(rich)
    got = negotiate(view, P)
    assert got == Outcome(decide(view, P), 4) and isinstance(got.decision, Propose)
    assert quorum_level(view.peers, P.quorum) == 9
    me = view.self_id
    held = negotiate(view_of(rich, self_id=me, dead={me}), P)  # holds early, still reports the level
    assert held.decision == NoChange(Hold.SELF_NOT_LIVE) and held.quorum_level == 2  # 2 of 2 live afford 2
    assert negotiate(view_of({"a": 3, "b": 1, "c": 1}), P).quorum_level == 1


def test_outcome_refuses_another_peers_invalid_open_proposal_once_with_its_reason():
    view, p = base_view()
    other = non_proposer(view)
    bad_seed = replace(p, growth_seed=p.growth_seed + 1)
    got = negotiate(replace(view, self_id=other, open_proposal=bad_seed), P)
    assert got.refused == RefusedProposal(p.proposer, 1, Refusal.BAD_SEED,
                                          f"growth seed {bad_seed.growth_seed} not derived from (epoch, level)")
    assert got.decision == NoChange(Hold.PROPOSAL_REFUSED, f"BAD_SEED: {got.refused.detail}")
    with pytest.raises(NegotiationError) as info:  # the same reason and detail validate_proposal raises
        validate_proposal(bad_seed, replace(view, self_id=other), P)
    assert (info.value.refusal, info.value.detail) == (got.refused.reason, got.refused.detail)
    # a valid proposal from the rightful proposer: acked, nothing refused
    valid = negotiate(replace(view, self_id=other, open_proposal=p), P)
    assert valid.refused is None and isinstance(valid.decision, AckProposal)


def test_outcome_never_refuses_our_own_proposal_but_still_holds_on_it():
    view, p = base_view()
    churned = view_of({"a": 3, "b": 0, "c": 0}, self_id=view.self_id, open_=p)  # no longer afforded
    got = negotiate(churned, P)
    assert got.refused is None
    assert got.decision.reason == Hold.PROPOSAL_REFUSED and got.decision.detail.startswith("BAD_LEVEL")


def test_outcome_reports_a_stale_or_expired_open_proposal_even_when_it_is_inert():
    view, p = base_view()
    other = non_proposer(view)
    expired = negotiate(replace(view, self_id=other, open_proposal=p, current_round=p.activate_round), P)
    assert expired.refused is not None and expired.refused.reason == Refusal.BAD_ACTIVATION
    assert not isinstance(expired.decision, AckProposal | Commit)  # an inert proposal is neither acked nor committed
    stale = negotiate(replace(view, self_id=other, open_proposal=replace(p, epoch=0)), P)
    assert stale.refused is not None and stale.refused.reason == Refusal.STALE_EPOCH
    assert stale.refused.epoch == 0
    # refused whatever this peer's own state: the count does not depend on being live
    dead = negotiate(view_of(THREE, self_id=other, dead={other}, open_=replace(p, epoch=0)), P)
    assert dead.decision == NoChange(Hold.SELF_NOT_LIVE) and dead.refused == stale.refused


def test_refusals_are_counted_and_never_merged():
    sim = Sim({"a": 3, "b": 3, "c": 3})
    group = set(sim.ceilings)
    proposer = proposer_for(1, group)
    liar = next(n for n in sorted(group) if n != proposer)
    before = {n: replace(node) for n, node in sim.nodes.items()}
    forged = proposal(1, 1, liar, ROUND + 2)
    for to in group:
        sim.deliver_proposal(to, forged, group)
    stale = proposal(0, 1, proposer, ROUND + 2)
    for to in group:
        sim.deliver_proposal(to, stale, group)
    assert sim.refused == Counter({Refusal.NOT_PROPOSER: 3, Refusal.STALE_EPOCH: 3})
    assert sim.nodes == before


# ---- validation of peer input ---------------------------------------------------------------------------------


def base_view(**kwargs) -> tuple[MeshView, Proposal]:
    view = view_of(**({"ceilings": THREE} | kwargs))
    return view, decide(view, P).proposal


@pytest.mark.parametrize("change, refusal", [
    (lambda v, p: replace(p, epoch=0), Refusal.STALE_EPOCH),
    (lambda v, p: replace(p, epoch=3), Refusal.FUTURE_EPOCH),
    (lambda v, p: replace(p, proposer=non_proposer(v)), Refusal.NOT_PROPOSER),
    (lambda v, p: replace(p, proposer="mallory"), Refusal.NOT_PROPOSER),
    (lambda v, p: replace(p, growth_seed=p.growth_seed + 1), Refusal.BAD_SEED),
    (lambda v, p: replace(p, level=2, growth_seed=growth_seed(1, 2)), Refusal.BAD_LEVEL),  # two steps
    (lambda v, p: replace(p, level=0, growth_seed=growth_seed(1, 0)), Refusal.BAD_LEVEL),  # no change
    (lambda v, p: replace(p, level=9, growth_seed=growth_seed(1, 9)), Refusal.BAD_LEVEL),  # above max
    (lambda v, p: replace(p, level=-1, growth_seed=growth_seed(1, -1)), Refusal.BAD_LEVEL),
    (lambda v, p: replace(p, direction=Direction.SHRINK), Refusal.BAD_LEVEL),  # shrink upwards
    (lambda v, p: replace(p, activate_round=ROUND), Refusal.BAD_ACTIVATION),  # not in the future
    (lambda v, p: replace(p, activate_round=ROUND + 5), Refusal.BAD_ACTIVATION),  # too far ahead
])
def test_bad_proposals_are_refused_with_a_typed_reason(change, refusal):
    view, p = base_view()
    validate_proposal(p, view, P)
    assert refusal_of(validate_proposal, change(view, p), view, P) == refusal


def test_growth_above_the_quorum_level_is_refused():
    view, p = base_view()
    poor = view_of({"a": 3, "b": 0, "c": 0}, self_id=view.self_id)
    assert refusal_of(validate_proposal, p, poor, P) == Refusal.BAD_LEVEL


def test_a_shrink_deeper_than_needed_is_refused():
    view = view_of(THREE, committed=LEVEL2, streaks={"a": 2, "b": 2})
    p = decide(view, P).proposal
    assert p.level == 1
    to_zero = replace(p, level=0, growth_seed=growth_seed(3, 0))
    assert refusal_of(validate_proposal, to_zero, view, P) == Refusal.BAD_LEVEL


def test_growth_inside_the_cooldown_is_refused():
    committed = agreement(1, 1, previous=0, activate=8)
    view = view_of(THREE, committed=committed, round_=11)
    p = decide(view, P).proposal
    assert p.activate_round == 13
    early = view_of(THREE, committed=committed, round_=10)  # a lagging acker: still in the window
    validate_proposal(p, early, P)
    assert refusal_of(validate_proposal, replace(p, activate_round=12), early, P) == Refusal.TOO_SOON


def test_a_second_proposal_for_a_live_epoch_conflicts_but_a_resend_is_fine():
    view, p = base_view()
    held = replace(view, open_proposal=p)
    validate_proposal(p, held, P)  # gossip re-delivery
    other = replace(p, activate_round=p.activate_round + 1)
    assert refusal_of(validate_proposal, other, held, P) == Refusal.CONFLICTING_PROPOSAL


def test_bad_acks_are_refused_with_a_typed_reason():
    view, p = base_view()
    other = non_proposer(view)
    held = replace(view, open_proposal=p)
    validate_ack(Ack.of(p, other), held, other)
    cases = [
        ((Ack.of(p, other), held, view.self_id), Refusal.BAD_ACK),  # forged: in another's name
        ((Ack.of(replace(p, level=2), other), held, other), Refusal.BAD_ACK),  # bound to another proposal
        ((Ack.of(p, "mallory"), held, "mallory"), Refusal.BAD_ACK),  # unknown peer
        ((Ack.of(p, other), replace(held, open_proposal=None), other), Refusal.BAD_ACK),  # nothing open
        ((Ack.of(p, other), replace(held, current_round=p.activate_round), other), Refusal.BAD_ACK),  # expired
        ((Ack.of(replace(p, epoch=0), other), held, other), Refusal.STALE_EPOCH),
        ((Ack.of(p, other), replace(held, acks=frozenset({Ack.of(p, other)})), other), Refusal.DUPLICATE_ACK),
    ]
    for args, refusal in cases:
        assert refusal_of(validate_ack, *args) == refusal, args
    dead = view_of(THREE, self_id=view.self_id, dead={other}, open_=p)
    assert refusal_of(validate_ack, Ack.of(p, other), dead, other) == Refusal.BAD_ACK


# ---- properties -----------------------------------------------------------------------------------------------


IDS = ("a", "b", "c", "d", "e", "f")
LOSS = st.sampled_from([0.0, 1.0, 1.5, 2.0, 2.5, float("nan")])


PARAMS = [  # a spread of settings (drawing each field separately makes hypothesis slow for nothing)
    P,
    Params(max_level=0),
    Params(max_level=1, quorum=1.0, activation_delay=1, slow_rounds=1, min_round_gap=0, plateau_window=1),
    Params(max_level=4, quorum=0.75, js_threshold=0.0, plateau_theta=0.5, slow_fraction=2 / 3, plateau_window=2),
    Params(max_level=3, quorum=0.51, activation_delay=3, slow_rounds=3, slow_fraction=1.0, min_round_gap=4,
           plateau_window=1, plateau_theta=0.0),
    replace(P, min_live_peers=2),
    replace(P, min_live_peers=3, max_level=2),
]


def params_st() -> st.SearchStrategy[Params]:
    return st.sampled_from(PARAMS)


@st.composite
def agreement_st(draw, max_level: int = 4) -> Agreement:
    epoch, level = draw(st.integers(0, 6)), draw(st.integers(0, max_level))
    return Agreement(epoch=epoch, level=level, previous_level=draw(st.integers(0, max_level)),
                     activate_round=draw(st.integers(0, 20)), proposer=draw(st.sampled_from(("",) + IDS)),
                     growth_seed=growth_seed(epoch, level))


@st.composite
def scenario(draw) -> tuple[MeshView, Params]:
    """Random views, biased toward the interesting ones: self live, flat losses, a proposal from the
    actual proposer, acks from live peers."""
    params = draw(params_st())
    n = draw(st.integers(1, len(IDS)))
    self_id = draw(st.sampled_from(IDS[:n]))
    peers = tuple(PeerView(nid, draw(st.integers(-1, 6)),
                           live=nid == self_id and draw(st.integers(0, 9)) > 0 or draw(st.integers(0, 4)) > 0,
                           over_budget_streak=draw(st.sampled_from([0, 0, 0, 1, 2, 3, 4]))) for nid in IDS[:n])
    committed = draw(agreement_st(params.max_level))
    flat = st.integers(2, 7).map(lambda k: (2.0,) * k)
    view = MeshView(self_id=self_id, current_round=committed.activate_round + draw(st.integers(-2, 10)),
                    committed=committed, peers=peers,
                    mesh_losses=draw(flat | st.lists(LOSS, max_size=6).map(tuple)),
                    js_divergence=draw(st.none() | st.floats(0, 1) | st.just(0.9)))
    kind = draw(st.sampled_from(["none", "decided", "decided", "random"]))
    p = None
    if kind == "decided":  # a proposal the proposer of this mesh would make, maybe a few rounds ago
        maker = proposer_for(committed.epoch + 1, view.live_ids()) or self_id
        back = draw(st.integers(0, 3))
        d = decide(replace(view, self_id=maker, current_round=view.current_round - back), params)
        p = d.proposal if isinstance(d, Propose) else None
    elif kind == "random":
        epoch = view.committed.epoch + draw(st.integers(-1, 2))
        level = draw(st.integers(-1, params.max_level + 1))
        p = Proposal(epoch=epoch, level=level, activate_round=view.current_round + draw(st.integers(-2, 6)),
                     proposer=draw(st.sampled_from(IDS + ("zz",))),
                     growth_seed=draw(st.sampled_from([growth_seed(epoch, level), 7])),
                     direction=draw(st.sampled_from(list(Direction))))
    acks: frozenset[Ack] = frozenset()
    if p is not None:
        ackers = draw(st.sets(st.sampled_from(view.live_ids() or [self_id])) | st.sets(st.sampled_from(IDS + ("zz",))))
        acks = frozenset(Ack.of(p, nid) for nid in ackers)
        if draw(st.booleans()):
            acks |= {Ack.of(replace(p, level=p.level + 1), draw(st.sampled_from(IDS)))}
    return replace(view, open_proposal=p, acks=acks), params


@settings(max_examples=80, deadline=None)
@given(scenario(), st.randoms(use_true_random=False))
def test_decide_is_deterministic_and_independent_of_peer_order(case, rng):
    view, params = case
    d = decide(view, params)
    assert decide(view, params) == d
    peers = list(view.peers)
    rng.shuffle(peers)
    assert decide(replace(view, peers=tuple(peers)), params) == d


@settings(max_examples=80, deadline=None)
@given(scenario())
def test_negotiate_is_decide_plus_its_diagnostics(case):
    """One pass gives what the separate calls gave: the decision, the capped quorum level and, for another
    peer's open proposal, exactly the refusal validate_proposal raises."""
    view, params = case
    got = negotiate(view, params)
    assert got.decision == decide(view, params)
    assert got.quorum_level == min(quorum_level(view.peers, params.quorum), params.max_level)
    p = view.open_proposal
    want = None
    if p is not None and p.proposer != view.self_id:
        try:
            validate_proposal(p, view, params)
        except NegotiationError as err:
            want = RefusedProposal(p.proposer, p.epoch, err.refusal, err.detail)
    assert got.refused == want


@settings(max_examples=80, deadline=None)
@given(scenario())
def test_decisions_are_consistent_with_validation_and_quorum(case):
    view, params = case
    d = decide(view, params)
    q_level = quorum_level(view.peers, params.quorum)
    if isinstance(d, Propose):
        validate_proposal(d.proposal, view, params)  # what we propose, every peer with our view accepts
        assert d.proposal.proposer == view.self_id == proposer_for(d.proposal.epoch, view.live_ids())
        assert 0 <= d.proposal.level <= params.max_level
        assert d.proposal.activate_round > view.current_round
    elif isinstance(d, AckProposal):
        validate_ack(d.ack, view, view.self_id)
    elif isinstance(d, Commit):
        a = d.agreement
        assert a.epoch == view.committed.epoch + 1  # epochs only grow
        assert a.activate_round > view.current_round  # activation is always in the future
        if a.level > view.committed.level:  # a commit never raises the level above what a quorum affords
            assert a.level <= q_level
        live = set(view.live_ids())
        ackers = {k.node_id for k in view.acks if k.binds(view.open_proposal)} & live
        assert len(ackers) >= quorum_count(len(live), params.quorum)


@settings(max_examples=80, deadline=None)
@given(scenario(), st.builds(Proposal, epoch=st.integers(-2, 9), level=st.integers(-2, 9),
                             activate_round=st.integers(-2, 40), proposer=st.sampled_from(IDS + ("", "zz")),
                             growth_seed=st.integers(0, 2**64), direction=st.sampled_from(list(Direction))),
       st.builds(Ack, epoch=st.integers(-2, 9), level=st.integers(-2, 9), proposer=st.sampled_from(IDS),
                 activate_round=st.integers(-2, 40), node_id=st.sampled_from(IDS + ("zz",))),
       st.none() | st.sampled_from(IDS))
def test_bad_input_never_crashes(case, p, ack, sender):
    view, params = case
    for call in (lambda: validate_proposal(p, view, params), lambda: validate_ack(ack, view, sender)):
        try:
            call()
        except NegotiationError as err:
            assert isinstance(err.refusal, Refusal) and str(err).startswith(err.refusal.value)


@settings(max_examples=100, deadline=None)
@given(agreement_st(), agreement_st(), agreement_st())
def test_reconcile_is_a_join(a, b, c):
    assert reconcile(a, b) == reconcile(b, a)
    assert reconcile(reconcile(a, b), c) == reconcile(a, reconcile(b, c))
    assert reconcile(a, a) == a
    assert reconcile(a, b).epoch == max(a.epoch, b.epoch)
    assert reconcile(a, b) in (a, b)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(agreement_st(), scenario()), max_size=8))
def test_committed_epochs_never_decrease(heard):
    """Whatever a peer hears (gossiped agreements, its own commits) in any order, its epoch only grows."""
    state = GENESIS
    for item in heard:
        if isinstance(item, Agreement):
            incoming = item
        else:
            view, params = item
            d = decide(view, params)
            if not isinstance(d, Commit):
                continue
            incoming = d.agreement
            assert incoming.epoch == view.committed.epoch + 1
        new = reconcile(state, incoming)
        assert new.epoch == max(state.epoch, incoming.epoch) >= state.epoch
        state = new


@settings(max_examples=100, deadline=None)
@given(agreement_st(), st.integers(-5, 10), st.none() | st.integers(0, 30))
def test_effective_level_never_exceeds_ceiling_or_level(a, ceiling, round_):
    lv = effective_level(a, ceiling, round_)
    assert 0 <= lv <= max(0, ceiling)
    assert lv <= (a.level if round_ is None else level_in_force(a, round_))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=1, max_size=9), st.integers(0, 10**6),
       st.sampled_from([2 / 3, 0.75, 1.0]))
def test_a_liar_is_one_vote(honest, claim, q):
    peers = [PeerView(f"h{i}", c) for i, c in enumerate(honest)]
    with_liar = quorum_level([*peers, PeerView("liar", claim)], q)
    k = quorum_count(len(honest) + 1, q)
    assert sum(1 for c in honest if c >= with_liar) >= k - 1  # all but one vote are honest peers
    assert math.isfinite(with_liar) and with_liar <= max(max(honest), claim)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=2, max_size=6),
       st.lists(st.tuples(st.integers(0, 63), st.sampled_from([0, 0, 1, 3]), st.integers(1, 4),
                          st.none() | st.tuples(st.integers(0, 5), st.integers(0, 5))),
                min_size=1, max_size=12))
def test_random_mesh_runs_keep_the_invariants(ceilings, steps):
    """A mesh under partitions, clock steps and re-measured ceilings: every commit was acked by a quorum
    of the committer's live view, never raised the level above what that quorum affords, epochs only
    grow per node, and nodes that commit one epoch inside one group agree on it."""
    ids = [f"n{i}" for i in range(len(ceilings))]
    sim = Sim(dict(zip(ids, ceilings, strict=True)))
    schedule = [(mask, advance, remeasure) for mask, advance, repeat, remeasure in steps for _ in range(repeat)]
    for mask, advance, remeasure in schedule:
        group = {nid for i, nid in enumerate(ids) if mask >> i & 1} or {ids[0]}
        if remeasure is not None:
            sim.ceilings[ids[remeasure[0] % len(ids)]] = remeasure[1]
        sim.round_ += advance
        epochs = {nid: node.committed.epoch for nid, node in sim.nodes.items()}
        views = {nid: sim.view(nid, group) for nid in group}
        decisions = sim.step(group)
        commits = {d.agreement for d in decisions.values() if isinstance(d, Commit)}
        assert len({(a.epoch, a.level, a.proposer) for a in commits}) <= 1, commits
        for nid, d in decisions.items():
            if isinstance(d, Commit):
                view = views[nid]
                if d.agreement.level > view.committed.level:
                    assert d.agreement.level <= quorum_level(view.peers, sim.params.quorum)
        for nid, node in sim.nodes.items():
            assert node.committed.epoch >= epochs[nid]
            assert effective_level(node.committed, sim.ceilings[nid]) <= max(0, sim.ceilings[nid])


def test_params_take_their_defaults_from_the_config_section():
    """One source of defaults: [negotiation] (fednode.config) is what Params falls back to."""
    from fednode.config import FAMILY_GROWTH_SIGNAL, NegotiationSection

    section, params = NegotiationSection(), Params(max_level=2)
    for key in ("plateau_window", "plateau_theta", "quorum", "js_threshold", "activation_delay", "min_round_gap",
                "min_live_peers"):
        assert getattr(params, key) == getattr(section, key), key
    assert params.growth_signal == FAMILY_GROWTH_SIGNAL["distilled"]
