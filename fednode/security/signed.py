"""Records signed by their owner's mesh certificate (negotiation records gossiped in PeerRecord)."""

from __future__ import annotations

from fednode.errors import ProtocolError, Reason
from fednode.security.pki import TrustStore
from fednode.v1 import peer_pb2 as pb

DIRECTIONS = ("", "grow", "shrink")  # fednode.mesh.negotiation.Direction; empty means grow


def verify_negotiation(trust: TrustStore, blob: pb.SignedBlob, node_id: str) -> pb.NegotiationRecord:
    """A record counts only when signed by its own node's mesh certificate."""
    signer = trust.verify_signature(bytes(blob.certificate_der), bytes(blob.body), bytes(blob.signature))
    if signer != node_id:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"negotiation record of {node_id} is signed by {signer}")
    try:
        rec = pb.NegotiationRecord.FromString(bytes(blob.body))
    except Exception:  # noqa: BLE001
        raise ProtocolError(Reason.MALFORMED, f"negotiation record of {node_id} does not parse") from None
    if rec.node_id != node_id:
        raise ProtocolError(Reason.BAD_SIGNATURE, f"negotiation record names {rec.node_id}, not {node_id}")
    for name in ("proposal", "ack"):  # the negotiator turns these into decisions: refuse what it cannot read
        if rec.HasField(name) and getattr(rec, name).direction not in DIRECTIONS:
            raise ProtocolError(Reason.MALFORMED, f"negotiation record of {node_id} has a {name} with direction "
                                                  f"{getattr(rec, name).direction[:20]!r}: use \"grow\" or "
                                                  f"\"shrink\"")
    return rec
