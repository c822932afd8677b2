"""Membership by push-pull anti-entropy of versioned peer records.

Each record is versioned by (incarnation, heartbeat): incarnation lives in the owner's signed
Hello and grows at every restart, the heartbeat grows at every gossip tick of its owner. Merging
keeps the newer version, so every node's view converges. Liveness is judged locally from how
long a record's version has not grown (suspect, then dead): no failure votes to forge or lose.
Only the owner can advance its heartbeat (a hash chain anchored in its signed Hello:
fednode.security.heartbeat) or say it left (a signed Farewell), so a member relaying gossip can
neither keep a stopped node alive nor make a running one look gone.
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

from fednode.errors import ProtocolError, Reason
from fednode.security import bounds
from fednode.security.heartbeat import HeartbeatChain, proves
from fednode.security.hello import check_compatible, verify_hello
from fednode.security.signed import verify_farewell, verify_negotiation
from fednode.security.trust import TrustStore
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
    proof: bytes = b""  # the owner's chain value for `heartbeat` (empty at or below the Hello's base)
    farewell: pb.SignedBlob | None = None  # the owner's signed goodbye, verified (with left = True)

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
        rec = pb.PeerRecord(hello=self.hello, heartbeat=self.heartbeat, left=self.left, last_round=self.last_round,
                            heartbeat_proof=self.proof)
        if self.negotiation_blob is not None:
            rec.negotiation.CopyFrom(self.negotiation_blob)
        if self.farewell is not None:
            rec.farewell.CopyFrom(self.farewell)
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


def check_same_daemon(current: pb.HelloBody, incoming: pb.HelloBody) -> None:
    """Within one incarnation a node's Hello may change its certificate or heartbeat anchor, never
    its payload key or address: two daemons running one identity (a copied config) would otherwise
    take turns, and peers would switch keys every gossip. A restart is a new incarnation."""
    if incoming.incarnation != current.incarnation:
        return
    if incoming.payload_public_key != current.payload_public_key or incoming.address != current.address:
        raise ProtocolError(Reason.DUPLICATE_IDENTITY,
                            f"{incoming.node_id} is announced from {incoming.address} and {current.address} in the "
                            f"same incarnation {incoming.incarnation}: two daemons run one certificate (a copied "
                            f"config?); stop one, each site needs its own (`fednode ca issue`)")


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
                 suspect_after: float, dead_after: float, clock: Callable[[], float] = time.monotonic,
                 chain: HeartbeatChain | None = None,
                 renew: Callable[[HeartbeatChain, int], pb.SignedHello] | None = None,
                 on_start: Callable[[str], None] = lambda _address: None):
        """`chain`: ours, anchored in `own_body` at heartbeat 1; `renew(chain, base)` signs a Hello
        with a new chain's anchor when ours runs out (no chain: our heartbeats carry no proof,
        which peers refuse: for tests of the receiving side only). `on_start(address)` is called for
        a peer first seen, or seen in a new incarnation (it restarted): the transport forgets its
        old connection."""
        self.trust = trust
        self.clock = clock
        self.suspect_after = suspect_after
        self.dead_after = dead_after
        self.chain, self.renew, self.on_start = chain, renew, on_start
        self.impostors: set[str] = set()  # addresses of other daemons seen announcing our node id
        self.self_member = Member(own_hello, own_body, heartbeat=1, left=False, last_round=0, changed_at=clock())
        self.members: dict[str, Member] = {}

    @property
    def node_id(self) -> str:
        return self.self_member.node_id

    def announce(self, hello: pb.SignedHello) -> None:
        """Our own Hello from now on (bound address, new certificate): the one place it changes, so
        the hello we gossip and the body we check peers against never disagree."""
        self.self_member.hello = hello
        self.self_member.body = pb.HelloBody.FromString(hello.body)

    def tick(self, last_round: int | None = None) -> None:
        """Advance our own heartbeat (call once per gossip interval)."""
        me = self.self_member
        me.heartbeat += 1
        me.changed_at = self.clock()
        if last_round is not None:
            me.last_round = last_round
        if self.chain is None:
            return
        if me.heartbeat - me.body.heartbeat_base > self.chain.length and self.renew is not None:
            self.chain = HeartbeatChain(length=self.chain.length)
            me.hello = self.renew(self.chain, me.heartbeat)  # signs body.heartbeat_base = me.heartbeat
            me.body = pb.HelloBody.FromString(me.hello.body)
        offset = me.heartbeat - me.body.heartbeat_base
        me.proof = self.chain.proof(offset) if 0 < offset <= self.chain.length else b""

    def set_negotiation(self, blob: pb.SignedBlob, record: pb.NegotiationRecord) -> None:
        self.self_member.negotiation_blob, self.self_member.negotiation = blob, record

    def leave(self, farewell: pb.SignedBlob) -> None:
        """Say goodbye with our signed Farewell (fednode.security.signed.sign_farewell)."""
        self.self_member.left = True
        self.self_member.farewell = farewell
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
            self._check_impostor(record)  # only we speak for ourselves
            return
        try:  # unsigned fields: bounded before they version or order anything
            bounds.check_int("heartbeat", record.heartbeat, bounds.MAX_HEARTBEAT, who=body.node_id or "?")
            bounds.check_int("last_round", record.last_round, bounds.MAX_ROUND, who=body.node_id or "?")
        except ProtocolError as exc:
            outcome.refused.append((body.node_id or "?", exc))
            return
        current = self.members.get(body.node_id)
        if not is_newer(record, body, current):
            return
        if current is None or current.hello != record.hello:
            try:  # a new identity or payload key: verify before believing it
                body = verify_hello(self.trust, record.hello)
                check_compatible(self.self_member.body, body)
                if current is not None:
                    check_same_daemon(current.body, body)
            except ProtocolError as exc:
                outcome.refused.append((body.node_id or "?", exc))
                return
        try:
            proof = self._proven_heartbeat(record, body, current)
            farewell = self._proven_farewell(record, body, current)
        except ProtocolError as exc:
            outcome.refused.append((body.node_id, exc))
            return
        if current is None:
            outcome.joined.append(body.node_id)
            log.info("peer joined", extra={"peer": body.node_id, "address": body.address})
        else:
            outcome.updated += 1
        if current is None or current.body.incarnation != body.incarnation:
            self.on_start(body.address)
        member = Member(record.hello, body, record.heartbeat, record.left, record.last_round, self.clock(),
                        proof=proof, farewell=farewell)
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

    def _check_impostor(self, record: pb.PeerRecord) -> None:
        """A verified Hello of our own node id that is not ours: another daemon runs with this
        node's certificate (a copied config or key). Logged once per address; we keep ours."""
        me = self.self_member.body
        if record.hello == self.self_member.hello:
            return  # our own record relayed back (every digest carries it): no signature to check
        try:
            body = verify_hello(self.trust, record.hello)
        except ProtocolError:
            return
        if body.payload_public_key == me.payload_public_key and body.address == me.address:
            return
        if body.address not in self.impostors:
            self.impostors.add(body.address)
            log.error("another daemon announces this node's id %s from %s (incarnation %d; ours: %s, %d): stop it; "
                      "each site needs its own certificate (`fednode ca issue`) and data_dir", me.node_id,
                      body.address, body.incarnation, me.address, me.incarnation,
                      extra={"reason": "DUPLICATE_IDENTITY"})

    @staticmethod
    def _proven_heartbeat(record: pb.PeerRecord, body: pb.HelloBody, current: Member | None) -> bytes:
        """The record's chain value, checked against the last one we verified for this Hello (or
        its anchor); a heartbeat at or below the Hello's base needs none (the Hello is its proof)."""
        offset = record.heartbeat - body.heartbeat_base
        if offset <= 0:
            return b""
        known, known_offset = bytes(body.heartbeat_anchor), 0
        if current is not None and current.hello == record.hello and current.proof:
            known, known_offset = current.proof, current.heartbeat - body.heartbeat_base
        proof = bytes(record.heartbeat_proof)
        if not proves(proof, offset, known, known_offset):
            raise ProtocolError(Reason.BAD_SIGNATURE, f"heartbeat {record.heartbeat} of {body.node_id} is not proven "
                                                      f"by its owner's chain: only the owner advances its heartbeat")
        return proof

    def _proven_farewell(self, record: pb.PeerRecord, body: pb.HelloBody,
                         current: Member | None) -> pb.SignedBlob | None:
        if not record.left:
            return None
        if current is not None and current.farewell is not None and current.farewell == record.farewell \
                and current.body.incarnation == body.incarnation:
            return current.farewell
        if not record.HasField("farewell"):
            raise ProtocolError(Reason.BAD_SIGNATURE, f"record says {body.node_id} left without its signed farewell: "
                                                      f"only the owner says it leaves")
        verify_farewell(self.trust, record.farewell, body.node_id, body.incarnation)
        return record.farewell

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
