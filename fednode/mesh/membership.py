"""Membership by push-pull anti-entropy of versioned peer records.

Each record is versioned by (incarnation, heartbeat): incarnation lives in the owner's signed
Hello and grows at every restart, the heartbeat grows at every gossip tick of its owner. Merging
keeps the newer version, so every node's view converges. Liveness is judged locally from how
long a record's version has not grown (suspect, then dead): no failure votes to forge or lose.
A record's identity and payload key come only from a Hello signed by a mesh certificate; a
certificate on the mesh's revocation list (which rides along in every Digest) is dropped from the
view (`purge_revoked`) and its records are refused from then on.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from fednode.errors import ProtocolError
from fednode.security.hello import check_compatible, verify_hello
from fednode.security.pki import TrustStore
from fednode.security.signed import verify_negotiation
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)


class Liveness(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass
class Member:
    hello: pb.SignedHello
    body: pb.HelloBody
    heartbeat: int
    left: bool
    last_round: int
    changed_at: float  # local monotonic time the version last grew
    negotiation_blob: pb.SignedBlob | None = None  # the owner's signed NegotiationRecord, verified
    negotiation: pb.NegotiationRecord | None = None

    @property
    def node_id(self) -> str:
        return self.body.node_id

    @property
    def address(self) -> str:
        return self.body.address

    @property
    def version(self) -> tuple[int, int]:
        return (self.body.incarnation, self.heartbeat)

    def record(self) -> pb.PeerRecord:
        rec = pb.PeerRecord(hello=self.hello, heartbeat=self.heartbeat, left=self.left, last_round=self.last_round)
        if self.negotiation_blob is not None:
            rec.negotiation.CopyFrom(self.negotiation_blob)
        return rec


def liveness(member: Member, now: float, suspect_after: float, dead_after: float) -> Liveness:
    """Pure liveness judgement from the age of a record's last version change."""
    if member.left:
        return Liveness.LEFT
    age = now - member.changed_at
    if age >= dead_after:
        return Liveness.DEAD
    if age >= suspect_after:
        return Liveness.SUSPECT
    return Liveness.ALIVE


def is_newer(incoming: pb.PeerRecord, incoming_body: pb.HelloBody, current: Member | None) -> bool:
    if current is None:
        return True
    return (incoming_body.incarnation, incoming.heartbeat) > current.version


@dataclass
class MergeOutcome:
    joined: list[str]
    updated: int
    refused: list[tuple[str, ProtocolError]]


class Membership:
    """This node's view of the mesh. Not thread-safe: owned by the node's event loop."""

    def __init__(self, own_hello: pb.SignedHello, own_body: pb.HelloBody, trust: TrustStore, *,
                 suspect_after: float, dead_after: float, clock: Callable[[], float] = time.monotonic):
        self.trust = trust
        self.clock = clock
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.self_member = Member(own_hello, own_body, heartbeat=1, left=False, last_round=0, changed_at=clock())
        self.members: dict[str, Member] = {}

    @property
    def node_id(self) -> str:
        return self.self_member.node_id

    def tick(self, last_round: int | None = None) -> None:
        """Advance our own heartbeat (call once per gossip interval)."""
        me = self.self_member
        me.heartbeat += 1
        me.changed_at = self.clock()
        if last_round is not None:
            me.last_round = last_round

    def set_negotiation(self, blob: pb.SignedBlob, record: pb.NegotiationRecord) -> None:
        self.self_member.negotiation_blob, self.self_member.negotiation = blob, record

    def leave(self) -> None:
        self.self_member.left = True
        self.tick()

    def digest(self) -> pb.Digest:
        """Our records, plus the revocation list in force (so it spreads with every exchange)."""
        records = [self.self_member.record()] + [m.record() for m in self.members.values()]
        revocation = self.trust.revocation
        return pb.Digest(sender_id=self.node_id, records=records,
                         revocation_list=revocation.der if revocation is not None else b"")

    def purge_revoked(self) -> list[str]:
        """Forget peers whose certificate the revocation list in force revokes; their ids. Their
        records, relayed again, are refused like any hello under a revoked certificate."""
        dropped = [nid for nid, m in self.members.items() if self.trust.is_revoked(m.hello.certificate_der)]
        for nid in dropped:
            del self.members[nid]
        return dropped

    def merge(self, digest: pb.Digest) -> MergeOutcome:
        outcome = MergeOutcome([], 0, [])
        for record in digest.records:
            self._merge_record(record, outcome)
        return outcome

    def merge_hello(self, hello: pb.SignedHello) -> MergeOutcome:
        """Learn a peer from its Handshake answer (heartbeat unknown: counts as fresh)."""
        outcome = MergeOutcome([], 0, [])
        self._merge_record(pb.PeerRecord(hello=hello, heartbeat=0), outcome)
        return outcome

    def _merge_record(self, record: pb.PeerRecord, outcome: MergeOutcome) -> None:
        try:
            body = pb.HelloBody.FromString(record.hello.body)
        except Exception:  # noqa: BLE001 - a malformed body is refused below by verify_hello
            body = pb.HelloBody()
        if body.node_id == self.node_id:
            return  # only we speak for ourselves
        current = self.members.get(body.node_id)
        if not is_newer(record, body, current):
            return
        if current is None or current.hello != record.hello:
            try:  # a new identity or payload key: verify before believing it
                body = verify_hello(self.trust, record.hello)
                check_compatible(self.self_member.body, body)
            except ProtocolError as exc:
                outcome.refused.append((body.node_id or "?", exc))
                return
        if current is None:
            outcome.joined.append(body.node_id)
            log.info("peer joined", extra={"peer": body.node_id, "address": body.address})
        else:
            outcome.updated += 1
        member = Member(record.hello, body, record.heartbeat, record.left, record.last_round, self.clock())
        if current is not None:
            member.negotiation_blob, member.negotiation = current.negotiation_blob, current.negotiation
        if record.HasField("negotiation") and (current is None or current.negotiation_blob != record.negotiation):
            try:
                rec = verify_negotiation(self.trust, record.negotiation, body.node_id)
                if member.negotiation is None or rec.seq > member.negotiation.seq or \
                        body.incarnation != (current.body.incarnation if current else -1):
                    member.negotiation_blob, member.negotiation = record.negotiation, rec
            except ProtocolError as exc:
                outcome.refused.append((body.node_id, exc))
        self.members[body.node_id] = member

    def state_of(self, node_id: str) -> Liveness:
        return liveness(self.members[node_id], self.clock(), self.suspect_after, self.dead_after)

    def states(self) -> dict[str, Liveness]:
        now = self.clock()
        return {nid: liveness(m, now, self.suspect_after, self.dead_after) for nid, m in self.members.items()}

    def live(self) -> list[Member]:
        """Peers that count for rounds: alive or merely suspect (not dead, not left)."""
        now = self.clock()
        return [m for m in self.members.values()
                if liveness(m, now, self.suspect_after, self.dead_after) in (Liveness.ALIVE, Liveness.SUSPECT)]

    def alive(self) -> list[Member]:
        now = self.clock()
        return [m for m in self.members.values()
                if liveness(m, now, self.suspect_after, self.dead_after) == Liveness.ALIVE]

    def gossip_targets(self, fanout: int, rng: random.Random) -> list[Member]:
        """Random live peers, plus now and then a dead one (so healed partitions re-merge)."""
        live = self.live()
        targets = rng.sample(live, min(fanout, len(live)))
        others = [m for m in self.members.values() if m not in live and not m.left]
        if others and rng.random() < 0.25:
            targets.append(rng.choice(others))
        return targets

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Liveness}
        for state in self.states().values():
            out[state.value] += 1
        return out
