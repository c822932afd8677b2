"""Catch-up decisions from signed claims only (pure: no clock, no network).

A peer's `last_round` in gossip is unsigned, and even its own signed claim may be a lie, so the
round a lagging node jumps to is one that several signed peers confirm: the k-th highest signed
round among live peers, with k = f + 1 for f = max(1, n // 3) tolerated liars (k = 1 in a
two-node mesh, where there is nobody to confirm). Donors are the peers whose signed round reaches
that target, least over-claiming first, minus the blacklisted ones; a fetched state may be at most
`slack` rounds past the target (the mesh moves on while we fetch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


def confirmations_needed(n_claims: int) -> int:
    """How many signed peers must claim a round before a catch-up may jump to it."""
    if n_claims <= 1:
        return n_claims
    return min(n_claims, max(1, n_claims // 3) + 1)


def confirmed_round(claims: Mapping[str, int]) -> int:
    """The highest round that at least `confirmations_needed` signed claims reach (0: none)."""
    rounds = sorted(claims.values(), reverse=True)
    k = confirmations_needed(len(rounds))
    return rounds[k - 1] if k else 0


def ahead_of_mesh(open_round: int, claims: Mapping[str, int]) -> bool:
    """Whether a round we open is beyond what the confirmed mesh works on (its committed round
    + 1): then nobody will push for it soon, and closing it early would let this node race on
    alone, never to meet the mesh again. One liar's high claim cannot hide it (confirmed round)."""
    return bool(claims) and open_round > confirmed_round(claims) + 1


# rounds in a row in which every update that reached us was refused as too far and none merged:
# then we are the one apart even when a single peer pushes to us (in a 4-member fanout-2 mesh a
# node hears one honest peer only; a lagger stayed apart for good, seen in CI). An insider pushing
# far states can make us re-sync at most this often, from a donor that signed rounds confirm.
ISOLATED_ROUNDS = 2 * 4

def next_far_streak(streak: int, refused_far: bool, merged: bool) -> int:
    """Rounds in a row whose arrivals were all refused as too far: a merge resets it, a round with
    nothing far (or nothing at all) leaves it, a round refused far with no merge extends it."""
    if merged:
        return 0
    return streak + 1 if refused_far else streak


DIVERGED_WINDOW = 4  # rounds: far refusals this recent (with no merge since) count towards `diverged`


def diverged(far: Mapping[str, int], round_: int, n_peers: int, window: int = DIVERGED_WINDOW) -> bool:
    """Whether this node, not its peers, is the one off: within `window` rounds it refused as too
    far (and merged nothing since) the states of at least two distinct peers, and of as many as
    confirm a catch-up. With one update a round a single refusal cannot tell who is off; several
    peers all far can, and one insider is one peer. A node that raced alone once never merged
    again: every honest state was far from its own, and its own from theirs."""
    recent = sum(1 for r in far.values() if r > round_ - window)
    return recent >= max(2, confirmations_needed(n_peers))


def missed_activation(activate_round: int, level: int, trained_level: int, committed_round: int) -> bool:
    """Whether an agreement heard late (we were away while the mesh agreed) took effect in a round
    we already committed at another level: the mesh then trained a slice we never did, our state is
    far from every peer's (each refuses the other's updates), and only the mesh's state brings us
    back in step; an agreement that activates in a round still to come needs nothing."""
    return level != trained_level and activate_round <= committed_round


@dataclass(frozen=True)
class CatchUpPlan:
    target: int  # the confirmed round
    donors: tuple[str, ...]  # in the order to try
    max_round: int  # a fetched state labelled above this is refused


def plan(own_round: int, lag: int, claims: Mapping[str, int], blacklisted: frozenset[str] | set[str] = frozenset(),
         *, slack: int = 2) -> CatchUpPlan | None:
    """What to fetch, from whom, or None when the confirmed mesh is fewer than `lag` rounds ahead."""
    target = confirmed_round(claims)
    if target - own_round < lag:
        return None
    donors = sorted((n for n, r in claims.items() if r >= target and n not in blacklisted),
                    key=lambda n: (claims[n] - target, n))
    if not donors:
        return None
    return CatchUpPlan(target=target, donors=tuple(donors), max_round=target + max(slack, lag))


def acceptable_round(fetched_round: int, own_round: int, p: CatchUpPlan, *, resync: bool = False) -> bool:
    """A fetched state must be newer than ours (re-syncing: at least the confirmed round) and not
    beyond what signed peers confirm."""
    low = min(own_round, p.target - 1) if resync else own_round
    return low < fetched_round <= p.max_round


def confirms(fetched_round: int, claims: Mapping[str, int], p: CatchUpPlan) -> bool:
    """Whether signed claims now confirm a state labelled `fetched_round` (within the plan's slack of
    the confirmed round). An honest donor's state is often newer than the plan allowed: with fast
    rounds the mesh moves on while our view of its signed rounds is a gossip or two old; fresh
    claims confirm it, a liar's label is never confirmed."""
    return fetched_round <= confirmed_round(claims) + (p.max_round - p.target)
