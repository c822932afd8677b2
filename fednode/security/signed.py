"""Records signed by their owner's mesh certificate (negotiation records gossiped in PeerRecord)."""

from __future__ import annotations

from fednode.errors import ProtocolError, Reason
from fednode.security import bounds
from fednode.security.identity import NodeIdentity
from fednode.security.trust import TrustStore
from fednode.v1 import peer_pb2 as pb

DIRECTIONS = ("", "grow", "shrink")  # fednode.mesh.negotiation.Direction; empty means grow


def verify_negotiation(trust: TrustStore, blob: pb.SignedBlob, node_id: str) -> pb.NegotiationRecord:
    """A record counts only when signed by its own node's mesh certificate."""
    signer = trust.verify_signature(bytes(blob.certificate_der), bytes(blob.body), bytes(blob.signature))
    if signer != node_id:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"negotiation record of {node_id} is signed by {signer}")
    try:
        rec: pb.NegotiationRecord = pb.NegotiationRecord.FromString(bytes(blob.body))
    except Exception:  # noqa: BLE001
        raise ProtocolError(Reason.MALFORMED, f"negotiation record of {node_id} does not parse") from None
    if rec.node_id != node_id:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"negotiation record names {rec.node_id}, not {node_id}")
    check_record_bounds(rec, node_id)
    for name in ("proposal", "ack"):  # the negotiator turns these into decisions: refuse what it cannot read
        if rec.HasField(name) and getattr(rec, name).direction not in DIRECTIONS:
            raise ProtocolError(Reason.MALFORMED, f"negotiation record of {node_id} has a {name} with direction "
                                                  f"{getattr(rec, name).direction[:20]!r}: use \"grow\" or "
                                                  f"\"shrink\"")
    return rec


def sign_farewell(identity: NodeIdentity, incarnation: int) -> pb.SignedBlob:
    body = pb.Farewell(node_id=identity.node_id, incarnation=incarnation).SerializeToString(deterministic=True)
    return pb.SignedBlob(body=body, signature=identity.sign(body), certificate_der=identity.cert_der)


def verify_farewell(trust: TrustStore, blob: pb.SignedBlob, node_id: str, incarnation: int) -> None:
    """A leave counts only when its owner signed it, for the incarnation it leaves."""
    signer = trust.verify_signature(bytes(blob.certificate_der), bytes(blob.body), bytes(blob.signature))
    try:
        farewell = pb.Farewell.FromString(bytes(blob.body))
    except Exception:  # noqa: BLE001
        raise ProtocolError(Reason.MALFORMED, f"farewell of {node_id} does not parse") from None
    if signer != node_id or farewell.node_id != node_id or farewell.incarnation != incarnation:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"farewell for {node_id} (incarnation {incarnation}) is signed by "
                                                  f"{signer} for {farewell.node_id[:64]!r} incarnation "
                                                  f"{farewell.incarnation}: only the owner says it leaves")


def check_record_bounds(rec: pb.NegotiationRecord, node_id: str) -> None:
    """Every integer of a negotiation record within what an honest mesh can reach (MALFORMED if not):
    the negotiator journals epochs and compares rounds, so a 2**63 must never get that far."""
    b, who = bounds, node_id
    b.check_int("negotiation seq", rec.seq, b.MAX_SEQ, who=who)
    b.check_int("negotiation round", rec.round, b.MAX_ROUND, who=who)
    b.check_int("negotiation ceiling", rec.ceiling, b.MAX_LEVEL, who=who)
    b.check_int("over_budget_streak", rec.over_budget_streak, b.MAX_STREAK, who=who)
    b.check_int("negotiation tokens", rec.tokens, b.MAX_TOKENS, who=who)
    if rec.HasField("committed"):
        a = rec.committed
        b.check_int("committed epoch", a.epoch, b.MAX_EPOCH, who=who)
        b.check_int("committed level", a.level, b.MAX_LEVEL, who=who)
        b.check_int("committed previous_level", a.previous_level, b.MAX_LEVEL, who=who)
        b.check_int("committed activate_round", a.activate_round, b.MAX_ROUND, who=who)
        b.check_int("committed growth_seed", a.growth_seed, b.MAX_SEED, who=who)
    for name in ("proposal", "ack"):
        if rec.HasField(name):
            p = getattr(rec, name)
            b.check_int(f"{name} epoch", p.epoch, b.MAX_EPOCH, who=who)
            b.check_int(f"{name} level", p.level, b.MAX_LEVEL, who=who)
            b.check_int(f"{name} activate_round", p.activate_round, b.MAX_ROUND, who=who)
            b.check_int(f"{name} growth_seed", p.growth_seed, b.MAX_SEED, who=who)
