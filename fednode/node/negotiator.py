"""Capacity negotiation on the wire: turn gossiped, signed NegotiationRecords into a MeshView,
run the pure decision function once (fednode.mesh.negotiation.negotiate: the decision and its
diagnostics), apply that outcome, and publish this node's own signed record. No coordinator: every
peer runs the same function on its view.
"""

from __future__ import annotations

import logging
import math

from fednode.config import FAMILY_GROWTH_SIGNAL, Config, Mode
from fednode.errors import Reason
from fednode.learning.probe import ProbeSignature, mean_pairwise_js
from fednode.mesh import negotiation as neg
from fednode.node.context import NodeContext
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)


def agreement_to_pb(a: neg.Agreement) -> pb.Agreement:
    return pb.Agreement(epoch=a.epoch, level=a.level, previous_level=a.previous_level,
                        activate_round=a.activate_round, proposer=a.proposer, growth_seed=a.growth_seed)


def agreement_from_pb(m: pb.Agreement) -> neg.Agreement:
    return neg.Agreement(epoch=m.epoch, level=m.level, previous_level=m.previous_level,
                         activate_round=m.activate_round, proposer=m.proposer, growth_seed=m.growth_seed)


def proposal_to_pb(p: neg.Proposal) -> pb.Proposal:
    return pb.Proposal(epoch=p.epoch, level=p.level, activate_round=p.activate_round, proposer=p.proposer,
                       growth_seed=p.growth_seed, direction=p.direction.value)


def proposal_from_pb(m: pb.Proposal) -> neg.Proposal:
    return neg.Proposal(epoch=m.epoch, level=m.level, activate_round=m.activate_round, proposer=m.proposer,
                        growth_seed=m.growth_seed, direction=neg.Direction(m.direction or "grow"))


def growth_signal(cfg: Config) -> str:
    """[negotiation] growth_signal, with "auto" resolved by the messenger family."""
    chosen = cfg.negotiation.growth_signal
    return FAMILY_GROWTH_SIGNAL[cfg.learning.family] if chosen == "auto" else chosen


class Negotiator:
    """Owned by the round loop: `level_for(round)` before training, `after_round(...)` after commit."""

    def __init__(self, ctx: NodeContext, *, ceiling: int, max_level: int, enabled: bool):
        cfg = ctx.cfg.negotiation
        self.ctx = ctx
        self.enabled = enabled
        self.ceiling = ceiling
        self.params = neg.Params(max_level=max_level, plateau_window=cfg.plateau_window,
                                 plateau_theta=cfg.plateau_theta, quorum=cfg.quorum, js_threshold=cfg.js_threshold,
                                 activation_delay=cfg.activation_delay, min_round_gap=cfg.min_round_gap,
                                 min_live_peers=cfg.min_live_peers, growth_signal=growth_signal(ctx.cfg))
        learning = ctx.cfg.learning  # static mode holds its configured level from the start
        start = min(learning.static_level, max_level) if learning.mode is Mode.STATIC else 0
        self.committed = neg.Agreement.genesis(start)
        self.proposal: neg.Proposal | None = None
        self.ack: neg.Proposal | None = None
        self.mesh_losses: list[float] = []
        self.seq = 0
        self.last_decision = "hold: starting"
        self._last_js = math.nan
        self.decisions: list[tuple[int, str, float]] = []  # (round, decision, mesh JS) per round, bounded
        self.quorum_level = 0
        self._refused: set[tuple[str, int]] = set()
        self.record = pb.NegotiationRecord()
        self.heard_late: neg.Agreement | None = None  # adopted from peers' proof, not our own commit

    # ------------------------------------------------------------------ state of the mesh
    def restore(self) -> None:
        """Resume the agreement this node had committed before a restart."""
        text = self.ctx.journal.get_meta("agreement")
        agreement = agreement_from_json(text) if text else None
        if agreement is not None:
            self.committed = agreement
            self.ctx.epoch, self.ctx.level = agreement.epoch, agreement.level

    def take_heard_late(self) -> neg.Agreement | None:
        """The agreement last adopted from peers' proof, once (the round loop checks whether we missed
        its activation)."""
        heard, self.heard_late = self.heard_late, None
        return heard

    def level_for(self, round_: int) -> int:
        """The slice this node trains in `round_`: the level in force, capped by its ceiling."""
        return neg.effective_level(self.committed, self.ceiling, round_)

    def peer_records(self) -> dict[str, pb.NegotiationRecord]:
        out = {}
        for member in self.ctx.membership.members.values():
            if member.negotiation is not None:
                out[member.node_id] = member.negotiation
        return out

    def view(self, round_: int, records: dict[str, pb.NegotiationRecord], live: set[str]) -> neg.MeshView:
        """This node's MeshView from the peer records and live set `after_round` read (one snapshot a round)."""
        ctx = self.ctx
        peers = [neg.PeerView(ctx.node_id, self.ceiling, True, 0)]
        for node_id, rec in records.items():
            peers.append(neg.PeerView(node_id, int(rec.ceiling), node_id in live, int(rec.over_budget_streak)))
        open_proposal = self.proposal
        acks: set[neg.Ack] = set()
        next_epoch = self.committed.epoch + 1
        rightful = neg.proposer_for(next_epoch, [ctx.node_id, *sorted(live & set(records))])
        for node_id, rec in records.items():
            if rec.HasField("proposal") and rec.proposal.proposer == node_id:
                candidate = proposal_from_pb(rec.proposal)
                if candidate.epoch != next_epoch or open_proposal is not None:
                    continue
                if node_id != rightful:  # never let a non-proposer's proposal block the rightful one
                    self._count_refusal(node_id, candidate.epoch, "NOT_PROPOSER",
                                        f"{node_id!r} is not epoch {candidate.epoch}'s proposer ({rightful!r})")
                    continue
                open_proposal = candidate
        if open_proposal is not None:
            for node_id, rec in records.items():
                if rec.HasField("ack") and node_id in live:
                    ack = neg.Ack.of(proposal_from_pb(rec.ack), node_id)
                    if ack.binds(open_proposal):
                        acks.add(ack)
            own = neg.Ack.of(self.ack, ctx.node_id) if self.ack is not None else None
            if own is not None and own.binds(open_proposal):
                acks.add(own)
        signatures = []
        for node_id, rec in [(ctx.node_id, self.record), *records.items()]:
            if rec.probe_signature and (node_id == ctx.node_id or node_id in live):
                try:
                    signatures.append(ProbeSignature.from_bytes(bytes(rec.probe_signature)))
                except Exception:  # noqa: BLE001 - a bad signature is that peer's problem, not ours
                    continue
        js = None
        if len(signatures) >= 2:
            try:
                js = mean_pairwise_js(signatures)
            except ValueError:
                js = None
        if js is None and self.params.js_threshold <= 0:
            js = 0.0  # a zero threshold asks for no heterogeneity signal at all
        return neg.MeshView(self_id=ctx.node_id, current_round=round_, committed=self.committed,
                            peers=tuple(peers), mesh_losses=tuple(self.mesh_losses), js_divergence=js,
                            open_proposal=open_proposal, acks=frozenset(acks))

    # ------------------------------------------------------------------ one step per round
    def after_round(self, round_: int, own_loss: float, tokens: int, over_budget_streak: int,
                    signature: bytes) -> None:
        """Reconcile agreements heard by gossip, decide, and publish our signed record."""
        ctx = self.ctx
        records = self.peer_records()
        live = {m.node_id for m in ctx.membership.live()}
        self._adopt_proven(records, live)
        losses = [own_loss] + [r.messenger_loss for n, r in records.items() if n in live]
        finite = [x for x in losses if math.isfinite(x)]
        self.mesh_losses.append(sum(finite) / len(finite) if finite else math.nan)
        self.mesh_losses = self.mesh_losses[-64:]
        self.record = pb.NegotiationRecord(node_id=ctx.node_id, round=round_, ceiling=self.ceiling,
                                           over_budget_streak=over_budget_streak, messenger_loss=own_loss,
                                           probe_signature=signature, tokens=tokens)
        if self.enabled:
            self._decide(self.view(round_, records, live))
            # what the benchmark reports next to the level: why the mesh grew, or held, each round
            self.decisions.append((round_, self.last_decision, self._last_js))
            self.decisions = self.decisions[-256:]
        self.publish(round_)

    def _adopt_proven(self, records: dict[str, pb.NegotiationRecord], live: set[str]) -> None:
        """The highest newer agreement a quorum of live members signed wins (partitions heal); a newer
        one without that proof is refused (UNPROVEN_AGREEMENT, counted once per claimer and epoch)."""
        claims = {}
        for node_id, rec in records.items():
            if node_id in live and rec.HasField("committed"):
                heard = agreement_from_pb(rec.committed)
                if heard.epoch > self.committed.epoch and self._plausible(heard, node_id):
                    claims[node_id] = heard
        if not claims:
            return
        acks = {node_id: proposal_from_pb(rec.ack) for node_id, rec in records.items()
                if node_id in live and rec.HasField("ack")}
        proven = neg.proven_agreement(self.committed, claims, live, self.params.quorum, own_ack=self.ack,
                                      self_id=self.ctx.node_id, peer_acks=acks)
        for node_id, agreement in proven.unproven:
            if proven.agreement is None or agreement.epoch > proven.agreement.epoch:
                self._count_refusal(node_id, agreement.epoch, Reason.Name(Reason.UNPROVEN_AGREEMENT),
                                    f"{node_id!r} claims epoch {agreement.epoch} level {agreement.level} committed, "
                                    f"but fewer than a quorum of live members sign it")
        if proven.agreement is not None:
            supporters = sorted(n for n, a in claims.items() if neg.commit_key(a) == neg.commit_key(proven.agreement))
            self._adopt(proven.agreement, f"proven by {','.join(supporters)}")
            self.heard_late = self.committed

    def _plausible(self, a: neg.Agreement, source: str) -> bool:
        ok = 0 <= a.level <= self.params.max_level and a.growth_seed == neg.growth_seed(a.epoch, a.level)
        if not ok and (source, a.epoch) not in self._refused:
            self._refused.add((source, a.epoch))
            self.ctx.metrics.reject(Reason.Name(Reason.BAD_SEED))
            log.warning("ignored an implausible agreement", extra={"peer": source, "epoch": a.epoch})
        return ok

    def _decide(self, view: neg.MeshView) -> None:
        """One pure pass (`negotiate`) over the view, then its outcome applied: status, refusal, decision."""
        self._last_js = view.js_divergence if view.js_divergence is not None else math.nan
        outcome = neg.negotiate(view, self.params)
        self.quorum_level = outcome.quorum_level
        if outcome.refused is not None:
            r = outcome.refused
            self._count_refusal(r.proposer, r.epoch, r.reason.name, r.detail)
        decision = outcome.decision
        round_ = view.current_round
        if isinstance(decision, neg.Propose):
            self.proposal = decision.proposal
            self.last_decision = f"propose {decision.proposal.direction.value} to level {decision.proposal.level}"
            log.info("proposing capacity change", extra={"epoch": decision.proposal.epoch,
                                                         "messenger_level": decision.proposal.level, "round": round_})
        elif isinstance(decision, neg.AckProposal):
            proposal = view.open_proposal
            assert proposal is not None
            self.ack = proposal
            self.last_decision = f"ack epoch {proposal.epoch} level {proposal.level}"
        elif isinstance(decision, neg.Commit):
            self._adopt(decision.agreement, decision.reason)
        else:
            self.last_decision = f"hold: {decision.reason.value}" + (f" ({decision.detail})" if decision.detail else "")

    def _count_refusal(self, peer: str, epoch: int, reason: str, detail: str) -> None:
        """Count and log each bad proposal once, not at every round it is still gossiped."""
        if (peer, epoch) in self._refused:
            return
        self._refused.add((peer, epoch))
        self.ctx.metrics.reject(reason)
        log.warning("refused a capacity proposal: %s", detail, extra={"peer": peer, "reason": reason})

    def _adopt(self, agreement: neg.Agreement, why: str) -> None:
        self.committed = neg.reconcile(self.committed, agreement)
        self.proposal = None
        self.ack = None
        self.ctx.epoch, self.ctx.level = self.committed.epoch, self.committed.level
        self.ctx.metrics.epoch.set(self.committed.epoch)
        self.ctx.metrics.level.set(self.committed.level)
        detail = _agreement_json(self.committed)
        self.ctx.journal.record_epoch(self.committed.epoch, self.committed.level, "committed", detail_json=detail)
        self.ctx.journal.set_meta("agreement", detail)
        self.last_decision = f"committed epoch {self.committed.epoch} level {self.committed.level} ({why})"
        log.info("capacity agreement committed", extra={"epoch": self.committed.epoch,
                                                        "messenger_level": self.committed.level,
                                                        "activate_round": self.committed.activate_round,
                                                        "why": why})

    def publish(self, round_: int) -> None:
        self.seq += 1
        rec = self.record
        rec.seq = self.seq
        rec.round = round_
        rec.committed.CopyFrom(agreement_to_pb(self.committed))
        if self.proposal is not None:
            rec.proposal.CopyFrom(proposal_to_pb(self.proposal))
        if self.ack is not None:
            rec.ack.CopyFrom(proposal_to_pb(self.ack))
        body = rec.SerializeToString(deterministic=True)
        blob = pb.SignedBlob(body=body, signature=self.ctx.identity.sign(body),
                             certificate_der=self.ctx.identity.cert_der)
        self.ctx.membership.set_negotiation(blob, rec)


def _agreement_json(a: neg.Agreement) -> str:
    import json

    return json.dumps({"epoch": a.epoch, "level": a.level, "previous_level": a.previous_level,
                       "activate_round": a.activate_round, "proposer": a.proposer, "growth_seed": a.growth_seed})


def agreement_from_json(text: str) -> neg.Agreement | None:
    import json

    try:
        d = json.loads(text)
        return neg.Agreement(epoch=int(d["epoch"]), level=int(d["level"]), previous_level=int(d["previous_level"]),
                             activate_round=int(d["activate_round"]), proposer=str(d["proposer"]),
                             growth_seed=int(d["growth_seed"]))
    except (ValueError, KeyError, TypeError, OverflowError):  # a damaged record: no agreement
        return None
