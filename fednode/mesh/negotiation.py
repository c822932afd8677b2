"""Decentralised capacity negotiation: a pure, deterministic decision function over a gossiped view.

Every peer runs `decide` on its own `MeshView` (rounds, liveness, ceilings, the mesh loss history
and the heterogeneity signal are all inputs: no clocks, no network, no randomness). The proposer
of epoch e is the live peer with the smallest sha256(id:e), so there are no duelling proposals in
one view; a proposal commits once a quorum (2/3) of the live peers ack it, and it activates at a
future round so no round mixes shapes. Committed agreements form a join-semilattice under
`reconcile` (the highest epoch wins, ties broken by a total order on every field), so healed
partitions converge whatever order views merge in.

Capacity follows resources only: a peer's ceiling is measured from its own step time and memory,
the mesh level is what a quorum of ceilings affords, and heterogeneity is a mesh-level growth
signal, never a per-peer input. A peer whose ceiling is below the committed level trains its own
prefix (`effective_level`) and is never excluded; a peer that lies about its ceiling is one vote
in the quorum count and still trains no more than the committed slice.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

from fednode.config import FAMILY_GROWTH_SIGNAL, GROWTH_SIGNALS, Family, NegotiationSection
from fednode.errors import ConfigError, FednodeError


class Refusal(enum.StrEnum):
    """Why a peer's proposal or ack is refused (values are the planned protocol `Reason` names)."""

    STALE_EPOCH = "STALE_EPOCH"  # epoch at or below our committed epoch
    FUTURE_EPOCH = "FUTURE_EPOCH"  # beyond committed+1: we must catch up on the commit first
    NOT_PROPOSER = "NOT_PROPOSER"  # the sender is not this epoch's proposer in our view
    BAD_LEVEL = "BAD_LEVEL"  # out of range, wrong step, or above what a quorum affords
    BAD_SEED = "BAD_SEED"  # the growth seed is not the one derived from (epoch, level)
    BAD_ACTIVATION = "BAD_ACTIVATION"  # activation round not in the future window
    TOO_SOON = "TOO_SOON"  # a growth inside the cooldown after the last change
    CONFLICTING_PROPOSAL = "CONFLICTING_PROPOSAL"  # another live proposal holds this epoch
    BAD_ACK = "BAD_ACK"  # ack for no open proposal, for a different one, or from a non-live peer
    DUPLICATE_ACK = "DUPLICATE_ACK"  # already counted (gossip re-delivery: harmless, not merged twice)


class NegotiationError(FednodeError):
    """A peer's negotiation message we refuse; `refusal` is the typed reason (counted, never merged)."""

    def __init__(self, refusal: Refusal, detail: str):
        super().__init__(f"{refusal.value}: {detail}")
        self.refusal = refusal
        self.detail = detail


class Direction(enum.StrEnum):
    GROW = "grow"
    SHRINK = "shrink"


class Hold(enum.StrEnum):
    """Why `decide` changes nothing this time."""

    SELF_NOT_LIVE = "self not live"
    TOO_FEW_LIVE = "fewer live peers than min_live_peers"
    WAITING_FOR_ACKS = "waiting for acks"
    PROPOSAL_REFUSED = "open proposal not valid in this view"
    AWAITING_PROPOSER = "a change is due but another peer proposes this epoch"
    AT_MIN_LEVEL = "over budget at level 0"
    AT_MAX_LEVEL = "at max level"
    COOLDOWN = "cooldown since last change"
    NOT_PLATEAUED = "messenger loss still improving"
    NO_QUORUM = "no quorum affords the next level"
    NO_HETEROGENEITY_SIGNAL = "no heterogeneity signal yet"
    LOW_HETEROGENEITY = "heterogeneity below threshold"




_DEFAULTS = NegotiationSection()


@dataclass(frozen=True)
class Params:
    """Negotiation knobs; identical on every peer (they are part of the mesh configuration).

    Defaults are `[negotiation]`'s (fednode.config.NegotiationSection, the one source); the
    slow-round rule has no config key yet. `activation_delay` >= 1 is what the decision needs; the
    config asks for >= 3 so that a proposal and its acks have time to gossip."""

    max_level: int
    plateau_window: int = _DEFAULTS.plateau_window  # W rounds
    plateau_theta: float = _DEFAULTS.plateau_theta  # relative drop over W rounds below which the loss plateaued
    quorum: float = _DEFAULTS.quorum  # fraction of live peers; > 1/2 so two quorums of one live set intersect
    js_threshold: float = _DEFAULTS.js_threshold  # grow only if mean pairwise JS divergence is at least this
    activation_delay: int = _DEFAULTS.activation_delay  # rounds between proposing and activating
    slow_rounds: int = 3  # k rounds over the time budget before shrinking
    slow_fraction: float = 0.5  # share of live peers that must be slow (0.5: the median round time)
    min_round_gap: int = _DEFAULTS.min_round_gap  # rounds after an activation before the next growth (hysteresis)
    min_live_peers: int = _DEFAULTS.min_live_peers  # a view with fewer live peers neither proposes, acks nor commits
    growth_signal: str = FAMILY_GROWTH_SIGNAL[Family.DISTILLED]  # plateau: once the shared loss stops improving;
    # budget: whenever a quorum affords the next level ([negotiation] growth_signal = "auto" picks per family)

    def __post_init__(self) -> None:
        checks = [
            (self.max_level >= 0, "max_level must be >= 0"),
            (self.plateau_window >= 1, "plateau_window must be >= 1"),
            (self.plateau_theta >= 0, "plateau_theta must be >= 0"),
            (self.growth_signal in GROWTH_SIGNALS, f"growth_signal must be one of {', '.join(GROWTH_SIGNALS)}"),
            (0.5 < self.quorum <= 1, "quorum must be in (0.5, 1]"),
            (self.js_threshold >= 0, "js_threshold must be >= 0"),
            (self.activation_delay >= 1, "activation_delay must be >= 1 (activation is a future round)"),
            (self.slow_rounds >= 1, "slow_rounds must be >= 1"),
            (0 < self.slow_fraction <= 1, "slow_fraction must be in (0, 1]"),
            (self.min_round_gap >= 0, "min_round_gap must be >= 0"),
            (self.min_live_peers >= 1, "min_live_peers must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"negotiation: {message}; fix the [negotiation] settings")


@dataclass(frozen=True)
class PeerView:
    """One peer as this node sees it: its self-measured ceiling and round-time streak, gossiped."""

    node_id: str
    ceiling: int  # largest level the peer says fits its budget (see ceiling_from_budget)
    live: bool = True  # alive or suspect in membership (not dead, not left)
    over_budget_streak: int = 0  # consecutive rounds, at the level in force, over the time budget


@dataclass(frozen=True)
class Agreement:
    """A committed level. `previous_level` is in force before `activate_round`, `level` from it on."""

    epoch: int
    level: int
    previous_level: int
    activate_round: int
    proposer: str
    growth_seed: int

    @classmethod
    def genesis(cls, level: int = 0) -> Agreement:
        return cls(epoch=0, level=level, previous_level=level, activate_round=0, proposer="",
                   growth_seed=growth_seed(0, level))


@dataclass(frozen=True)
class Proposal:
    epoch: int
    level: int
    activate_round: int
    proposer: str
    growth_seed: int
    direction: Direction


@dataclass(frozen=True)
class Ack:
    """An ack binds to one exact proposal, so it cannot be replayed for another level or proposer."""

    epoch: int
    level: int
    proposer: str
    activate_round: int
    node_id: str

    @classmethod
    def of(cls, proposal: Proposal, node_id: str) -> Ack:
        return cls(proposal.epoch, proposal.level, proposal.proposer, proposal.activate_round, node_id)

    def binds(self, proposal: Proposal) -> bool:
        return (self.epoch, self.level, self.proposer, self.activate_round) == (
            proposal.epoch, proposal.level, proposal.proposer, proposal.activate_round)


@dataclass(frozen=True)
class MeshView:
    """Everything `decide` may look at; built by the daemon from membership and gossip."""

    self_id: str
    current_round: int
    committed: Agreement
    peers: tuple[PeerView, ...]  # self included
    mesh_losses: tuple[float, ...] = ()  # mean messenger held-out loss per round, latest last
    js_divergence: float | None = None  # mean pairwise JS of messengers on the public probe set
    open_proposal: Proposal | None = None
    acks: frozenset[Ack] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        ids = [p.node_id for p in self.peers]
        if len(ids) != len(set(ids)):
            raise ValueError("MeshView.peers holds a node id twice")

    def live_ids(self) -> list[str]:
        return sorted(p.node_id for p in self.peers if p.live)

    def peer(self, node_id: str) -> PeerView | None:
        return next((p for p in self.peers if p.node_id == node_id), None)


@dataclass(frozen=True)
class NoChange:
    reason: Hold
    detail: str = ""


@dataclass(frozen=True)
class Propose:
    proposal: Proposal

    @property
    def reason(self) -> str:
        return self.proposal.direction.value


@dataclass(frozen=True)
class AckProposal:
    ack: Ack
    reason: str = "valid proposal"


@dataclass(frozen=True)
class Commit:
    agreement: Agreement
    reason: str = "quorum acked"


Decision = NoChange | Propose | AckProposal | Commit


@dataclass(frozen=True)
class RefusedProposal:
    """Another peer's open proposal that this view refuses (the daemon counts and logs it)."""

    proposer: str
    epoch: int
    reason: Refusal
    detail: str


@dataclass(frozen=True)
class Outcome:
    """One round of negotiation from one view: the decision and the diagnostics the daemon reports."""

    decision: Decision
    quorum_level: int  # what a quorum of live ceilings affords, capped at max_level (shown in status)
    refused: RefusedProposal | None = None  # the open proposal, when another peer's and invalid in this view


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def growth_seed(epoch: int, level: int) -> int:
    """Seed for the new coordinates; from (epoch, level), not the proposer, so two same-epoch commits
    of one level (possible across a partition) still grow bit-identically."""
    return int.from_bytes(_digest(f"fednode-growth:{epoch}:{level}")[:8], "big") >> 1  # fits int64


def proposer_rank(epoch: int, node_id: str) -> tuple[bytes, str]:
    """Sort key for the proposer draw; the id breaks a (practically impossible) hash tie."""
    return (_digest(f"{node_id}:{epoch}"), node_id)


def proposer_for(epoch: int, live_ids: Iterable[str]) -> str | None:
    """The live peer with the smallest sha256(id:epoch); None for an empty live set."""
    ids = set(live_ids)
    return min(ids, key=lambda nid: proposer_rank(epoch, nid)) if ids else None


def quorum_count(n_live: int, quorum: float) -> int:
    """Smallest k with k >= quorum * n_live (exact rational arithmetic: 2/3 of 3 is 2, not 3)."""
    q = Fraction(quorum).limit_denominator(10_000)
    return max(1, math.ceil(q * n_live)) if n_live > 0 else 0


def quorum_level(peers: Iterable[PeerView], quorum: float) -> int:
    """Largest level that at least a quorum of live peers can afford: the k-th largest live ceiling.

    A peer claiming a huge ceiling is one vote: with f liars the result is still afforded by at
    least k - f honest live peers."""
    ceilings = sorted((max(0, p.ceiling) for p in peers if p.live), reverse=True)
    k = quorum_count(len(ceilings), quorum)
    return ceilings[k - 1] if ceilings else 0


def plateaued(losses: Sequence[float], window: int, theta: float) -> bool:
    """Relative drop over the last `window` rounds below `theta` (needs window + 1 points, all finite).

    A rising loss counts as plateaued (it is not improving)."""
    if window < 1 or len(losses) < window + 1:
        return False
    old, new = losses[-window - 1], losses[-1]
    if not (math.isfinite(old) and math.isfinite(new)):
        return False
    if old == 0:
        return new >= old
    return (old - new) / abs(old) < theta


def level_in_force(agreement: Agreement, round_: int) -> int:
    """The level trained in `round_`: the previous level until the activation round, then the new one."""
    return agreement.level if round_ >= agreement.activate_round else agreement.previous_level


def effective_level(agreement: Agreement, ceiling: int, round_: int | None = None) -> int:
    """The prefix a peer trains: the committed level (or the one in force at `round_`) capped by its
    own ceiling. Never below 0: nobody is excluded, a low peer trains its own slice."""
    level = agreement.level if round_ is None else level_in_force(agreement, round_)
    return max(0, min(level, ceiling))


def ceiling_from_budget(step_times_by_level: Mapping[int, float], memory_by_level: Mapping[int, int],
                        time_budget_s: float, memory_budget_bytes: int) -> int:
    """Largest level L such that every level 0..L was measured and fits both budgets; 0 if none.

    Contiguous on purpose: cost grows with a nested level, so a noisy fit above a misfit is noise."""
    best = 0
    level = 0
    while level in step_times_by_level and level in memory_by_level:
        step, memory = step_times_by_level[level], memory_by_level[level]
        if not (math.isfinite(step) and 0 <= step <= time_budget_s and 0 <= memory <= memory_budget_bytes):
            break
        best = level
        level += 1
    return best


def reconcile(a: Agreement, b: Agreement) -> Agreement:
    """Join of two committed agreements: the highest epoch wins; within one epoch the higher level
    (a committed growth is never undone by a merge), then proposer, activation round, seed,
    previous level. A total order on every field makes this commutative, associative, idempotent."""
    def key(x: Agreement) -> tuple[int, int, str, int, int, int]:
        return (x.epoch, x.level, x.proposer, x.activate_round, x.growth_seed, x.previous_level)

    return a if key(a) >= key(b) else b


def _expired(proposal: Proposal, current_round: int) -> bool:
    """A proposal can only commit before its activation round; after that it is dead."""
    return current_round >= proposal.activate_round


def _pending(view: MeshView) -> Proposal | None:
    """The open proposal if it is for the next epoch and can still commit; anything else is inert."""
    p = view.open_proposal
    if p is None or p.epoch != view.committed.epoch + 1 or _expired(p, view.current_round):
        return None
    return p


def _proposal_refusal(proposal: Proposal, view: MeshView, params: Params, live: Sequence[str],
                      afforded: int) -> tuple[Refusal, str] | None:
    """Why `proposal` may not be open in `view`, or None; `live` is view.live_ids() and `afforded`
    quorum_level(view.peers, params.quorum) (uncapped), computed once by the caller."""
    committed = view.committed
    if proposal.epoch <= committed.epoch:
        return Refusal.STALE_EPOCH, f"epoch {proposal.epoch} <= committed epoch {committed.epoch}"
    if proposal.epoch > committed.epoch + 1:
        return Refusal.FUTURE_EPOCH, f"epoch {proposal.epoch} > {committed.epoch + 1}; fetch the newer commit first"
    expected = proposer_for(proposal.epoch, live)
    if proposal.proposer not in live or proposal.proposer != expected:
        return Refusal.NOT_PROPOSER, f"{proposal.proposer!r} is not epoch {proposal.epoch}'s proposer ({expected!r})"
    if proposal.growth_seed != growth_seed(proposal.epoch, proposal.level):
        return Refusal.BAD_SEED, f"growth seed {proposal.growth_seed} not derived from (epoch, level)"
    level, current = proposal.level, committed.level
    if not 0 <= level <= params.max_level:
        return Refusal.BAD_LEVEL, f"level {level} outside [0, {params.max_level}]"
    if proposal.direction == Direction.GROW:
        if level != current + 1:
            return Refusal.BAD_LEVEL, f"growth must go from {current} to {current + 1}, not {level}"
        if level > afforded:
            return Refusal.BAD_LEVEL, f"level {level} above what a quorum affords ({afforded})"
    else:
        floor = max(0, min(current - 1, afforded))
        if not floor <= level < current:
            return Refusal.BAD_LEVEL, f"shrink from {current} must land in [{floor}, {current - 1}], not {level}"
    # the window tolerates an acker up to activation_delay rounds behind the proposer
    low = max(view.current_round, committed.activate_round)
    if not low < proposal.activate_round <= low + 2 * params.activation_delay:
        return Refusal.BAD_ACTIVATION, (f"activation round {proposal.activate_round} not in "
                                        f"({low}, {low + 2 * params.activation_delay}]")
    earliest = committed.activate_round + params.min_round_gap + params.activation_delay
    if proposal.direction == Direction.GROW and committed.epoch > 0 and proposal.activate_round < earliest:
        return Refusal.TOO_SOON, f"growth activating at {proposal.activate_round} before {earliest}"
    pending = _pending(view)
    if pending is not None and pending != proposal:
        return Refusal.CONFLICTING_PROPOSAL, f"epoch {proposal.epoch} already has a live proposal"
    return None


def validate_proposal(proposal: Proposal, view: MeshView, params: Params) -> None:
    """Raise NegotiationError unless `proposal` may become this view's open proposal.

    Re-delivery of the proposal already open is accepted (idempotent). Checks bounds only, not the
    proposer's plateau/heterogeneity judgement: views differ slightly, resources are what matter."""
    refusal = _proposal_refusal(proposal, view, params, view.live_ids(), quorum_level(view.peers, params.quorum))
    if refusal is not None:
        raise NegotiationError(*refusal)


def validate_ack(ack: Ack, view: MeshView, sender: str | None = None) -> None:
    """Raise NegotiationError unless `ack` is a new ack for the open proposal from a live known peer.

    `sender` is the authenticated sender (signed envelope) when known: an ack in another's name is forged."""
    if sender is not None and sender != ack.node_id:
        raise NegotiationError(Refusal.BAD_ACK, f"ack in the name of {ack.node_id!r} sent by {sender!r}")
    if ack.epoch <= view.committed.epoch:
        raise NegotiationError(Refusal.STALE_EPOCH, f"ack for epoch {ack.epoch} <= committed {view.committed.epoch}")
    pending = _pending(view)
    if pending is None or not ack.binds(pending):
        raise NegotiationError(Refusal.BAD_ACK, f"ack from {ack.node_id!r} matches no open proposal")
    peer = view.peer(ack.node_id)
    if peer is None or not peer.live:
        raise NegotiationError(Refusal.BAD_ACK, f"ack from {ack.node_id!r}, not a live member")
    if ack in view.acks:
        raise NegotiationError(Refusal.DUPLICATE_ACK, f"ack from {ack.node_id!r} already counted")


def _committable(proposal: Proposal, view: MeshView, params: Params, q_level: int) -> bool:
    """Checks a quorum of acks cannot override: a sane level and seed, and never a rise above what a
    quorum of live peers affords now (churn since the proposal). Proposer or round drift is tolerated:
    the acks already show a quorum agreed."""
    level = proposal.level
    return (0 <= level <= params.max_level and proposal.growth_seed == growth_seed(proposal.epoch, level)
            and (level <= view.committed.level or level <= q_level))


def _commit_of(proposal: Proposal, committed: Agreement) -> Agreement:
    return Agreement(epoch=proposal.epoch, level=proposal.level,
                     previous_level=level_in_force(committed, proposal.activate_round - 1),
                     activate_round=proposal.activate_round, proposer=proposal.proposer,
                     growth_seed=proposal.growth_seed)


def _wanted(view: MeshView, params: Params, q_level: int) -> tuple[Direction, int] | NoChange:
    """The change this view calls for (shrink first), or why none."""
    committed, live = view.committed, [p for p in view.peers if p.live]
    current, rnd = committed.level, view.current_round
    slow = sum(1 for p in live if p.over_budget_streak >= params.slow_rounds)
    # a streak only blames the level in force once it has run k rounds at that level
    slow_due = (slow >= quorum_count(len(live), params.slow_fraction)
                and rnd - committed.activate_round >= params.slow_rounds)
    if q_level < current or slow_due:
        if current == 0:
            return NoChange(Hold.AT_MIN_LEVEL)
        return Direction.SHRINK, max(0, min(current - 1, q_level))
    if current >= params.max_level:
        return NoChange(Hold.AT_MAX_LEVEL)
    if committed.epoch > 0 and rnd < committed.activate_round + params.min_round_gap:
        return NoChange(Hold.COOLDOWN, f"until round {committed.activate_round + params.min_round_gap}")
    if params.growth_signal == "plateau" and not plateaued(view.mesh_losses, params.plateau_window,
                                                           params.plateau_theta):
        return NoChange(Hold.NOT_PLATEAUED)
    if q_level < current + 1:
        return NoChange(Hold.NO_QUORUM, f"quorum affords {q_level}")
    if view.js_divergence is None or not math.isfinite(view.js_divergence):
        return NoChange(Hold.NO_HETEROGENEITY_SIGNAL)
    if view.js_divergence < params.js_threshold:
        return NoChange(Hold.LOW_HETEROGENEITY, f"{view.js_divergence:.4g} < {params.js_threshold:.4g}")
    return Direction.GROW, current + 1


def negotiate(view: MeshView, params: Params) -> Outcome:
    """One pass over this peer's view: the decision (see `decide`) with its diagnostics, each computed
    once. `quorum_level` is reported whatever the decision; `refused` is the open proposal of another
    peer when it is not valid in this view (counted by the daemon), None for a valid one or our own."""
    live = view.live_ids()
    afforded = quorum_level(view.peers, params.quorum)
    q_level = min(afforded, params.max_level)
    open_ = view.open_proposal
    refusal = None if open_ is None else _proposal_refusal(open_, view, params, live, afforded)
    refused = None
    if open_ is not None and refusal is not None and open_.proposer != view.self_id:
        refused = RefusedProposal(open_.proposer, open_.epoch, *refusal)
    return Outcome(_decision(view, params, live, q_level, refusal), q_level, refused)


def decide(view: MeshView, params: Params) -> Decision:
    """What this peer does next, as a pure function of its view (same view, same answer everywhere).

    Order: commit an open proposal a quorum acked; else ack it if valid and not yet acked; an open
    live proposal blocks new ones until it activates or expires; else, if this peer is the next
    epoch's proposer and the view calls for a change, propose it. `negotiate` adds the diagnostics."""
    return negotiate(view, params).decision


def _decision(view: MeshView, params: Params, live: list[str], q_level: int,
              refusal: tuple[Refusal, str] | None) -> Decision:
    """`decide`'s body; `refusal` is the open proposal's (which is the pending one whenever one is pending)."""
    me = view.peer(view.self_id)
    if me is None or not me.live:
        return NoChange(Hold.SELF_NOT_LIVE)
    if len(live) < params.min_live_peers:
        return NoChange(Hold.TOO_FEW_LIVE, f"{len(live)} < {params.min_live_peers}")
    pending = _pending(view)
    if pending is not None:
        need = quorum_count(len(live), params.quorum)
        ackers = {a.node_id for a in view.acks if a.binds(pending)} & set(live)
        if len(ackers) >= need and _committable(pending, view, params, q_level):
            return Commit(_commit_of(pending, view.committed))
        if refusal is not None:
            return NoChange(Hold.PROPOSAL_REFUSED, f"{refusal[0].value}: {refusal[1]}")
        if view.self_id not in ackers:
            return AckProposal(Ack.of(pending, view.self_id))
        return NoChange(Hold.WAITING_FOR_ACKS, f"{len(ackers)} of {need}")
    wanted = _wanted(view, params, q_level)
    if isinstance(wanted, NoChange):
        return wanted
    direction, level = wanted
    epoch = view.committed.epoch + 1
    if proposer_for(epoch, live) != view.self_id:
        return NoChange(Hold.AWAITING_PROPOSER, f"{direction.value} to {level}")
    activate = max(view.current_round, view.committed.activate_round) + params.activation_delay
    return Propose(Proposal(epoch=epoch, level=level, activate_round=activate, proposer=view.self_id,
                            growth_seed=growth_seed(epoch, level), direction=direction))


def commit_key(a: Agreement) -> tuple[int, int, int, str, int]:
    """What one commit is, whoever reports it (previous_level is derived locally from each history)."""
    return (a.epoch, a.level, a.activate_round, a.proposer, a.growth_seed)


@dataclass(frozen=True)
class Proven:
    agreement: Agreement | None  # the highest newer agreement a quorum of live members signed, if any
    unproven: tuple[tuple[str, Agreement], ...]  # newer claims without that proof: (claimer, agreement)


def proven_agreement(committed: Agreement, claims: Mapping[str, Agreement], live_ids: Iterable[str],
                     quorum: float, own_ack: Proposal | None = None, self_id: str = "",
                     peer_acks: Mapping[str, Proposal] | None = None) -> Proven:
    """Which committed agreement heard by gossip may be adopted: one that a quorum of the live members
    (self counted only when it acked: below) vouch for, each by its own signed record claiming that very commit
    or acking the proposal it commits. An honest proposer commits only after a quorum acked, so those
    acks (or the commits that replace them) are the proof; one liar, or a minority, cannot make it.
    Acks count because the proposer's commit is usually heard first: waiting for a quorum of *commit*
    claims would leave every acker waiting on the others. Pure.

    `claims` are the agreements in live peers' signed records and `peer_acks` the proposals they ack
    (self excluded; our own ack is `own_ack`).

    We count in the quorum's base only when we acked: a node that was away while the mesh agreed
    (paused, partitioned, restarting) has no vote to give, and counting it as a silent "no" let one
    silent or lying member keep it out of the agreement for ever (2 honest claims of 4 live < 3), at
    a level apart from the mesh whose updates it then refused. Without us, a quorum (2/3) of the
    other live members is still more than a third of them: never the liars alone."""
    others = set(live_ids) - {self_id}
    groups: dict[tuple[int, int, int, str, int], list[tuple[str, Agreement]]] = {}
    for node_id, agreement in sorted(claims.items()):
        if node_id in others and agreement.epoch > committed.epoch:
            groups.setdefault(commit_key(agreement), []).append((node_id, agreement))
    ackers: dict[tuple[int, int, int, str, int], set[str]] = {}
    for node_id, ack in (peer_acks or {}).items():
        if node_id in others:
            ackers.setdefault(_proposal_key(ack), set()).add(node_id)
    own_key = _proposal_key(own_ack) if own_ack is not None and self_id else None
    best: Agreement | None = None
    unproven: list[tuple[str, Agreement]] = []
    for key, supporters in groups.items():
        we_acked = key == own_key
        votes = {n for n, _ in supporters} | ackers.get(key, set()) | ({self_id} if we_acked else set())
        if len(votes) >= quorum_count(len(others) + we_acked, quorum):
            candidate = supporters[0][1]
            for _, other in supporters[1:]:
                candidate = reconcile(candidate, other)
            best = candidate if best is None else reconcile(best, candidate)
        else:
            unproven.extend(supporters)
    return Proven(best, tuple(unproven))


def _proposal_key(p: Proposal) -> tuple[int, int, int, str, int]:
    return (p.epoch, p.level, p.activate_round, p.proposer, p.growth_seed)
