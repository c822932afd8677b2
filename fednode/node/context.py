"""What the parts of a running node share: identity, view of the mesh, store and counters."""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from fednode.config import Config
from fednode.errors import ProtocolError, StoreError, reason_name
from fednode.mesh.membership import Member, Membership
from fednode.node.exchange import Recipient
from fednode.node.gate import PeerGate
from fednode.node.inbox import Inbox
from fednode.observability.metrics import NodeMetrics
from fednode.security.envelope import PayloadKey
from fednode.security.identity import NodeIdentity
from fednode.security.revocation import CRL_FILE, RevocationList, serial_hex
from fednode.security.trust import TrustStore
from fednode.store.atomic import write_atomic
from fednode.store.journal import Journal
from fednode.transport.base import Transport
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)


class Phase(enum.StrEnum):
    STARTING = "starting"
    CATCHING_UP = "catching-up"
    TRAINING = "training"
    PUSHING = "pushing"
    COLLECTING = "collecting"
    MERGING = "merging"
    COMMITTING = "committing"
    DONE = "done"
    DRAINING = "draining"
    STOPPED = "stopped"


@dataclass
class NodeContext:
    cfg: Config
    identity: NodeIdentity
    trust: TrustStore
    payload_key: PayloadKey
    journal: Journal
    membership: Membership
    transport: Transport
    metrics: NodeMetrics
    inbox: Inbox = field(default_factory=Inbox)
    phase: Phase = Phase.STARTING
    committed_round: int = 0
    epoch: int = 0
    level: int = 0
    last_loss: float = float("nan")
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    gate: PeerGate = field(init=False)  # the one check of every caller, and the count of every refusal

    def __post_init__(self) -> None:
        self.gate = PeerGate(self.trust, self.metrics)

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def own_hello(self) -> pb.SignedHello:
        """Our signed Hello as peers get it (the membership owns it: `Membership.announce`)."""
        return self.membership.self_member.hello

    @property
    def own_body(self) -> pb.HelloBody:
        return self.membership.self_member.body

    @property
    def checkpoint_dir(self) -> Path:
        return self.cfg.node.data_dir / "checkpoints"

    @property
    def chunk_size(self) -> int:
        return self.cfg.limits.chunk_kib * 1024

    @property
    def max_payload(self) -> int:
        return self.cfg.limits.max_payload_mib * 1024 * 1024

    def recipient(self, member: Member) -> Recipient:
        return Recipient(member.node_id, member.address, bytes(member.body.payload_public_key))

    # ------------------------------------------------------------------ revocation

    @property
    def revocation_path(self) -> Path:
        """Where the revocation list in force is kept (it survives restarts)."""
        return self.cfg.node.data_dir / CRL_FILE

    def offer_revocation_list(self, data: bytes, source: str) -> bool:
        """A revocation list heard from `source` (a peer, a file): adopt it when the mesh CA signed it
        and it is newer than ours. True when adopted. A forged list is counted and logged once."""
        if not data:
            return False
        try:
            adopted = self.trust.consider_revocation_list(data)
        except ProtocolError as exc:
            self.metrics.reject(reason_name(exc.reason))
            log.warning("refused revocation list: %s", exc.detail,
                        extra={"peer": source, "reason": reason_name(exc.reason)})
            return False
        if adopted is None:
            return False
        self.revocation_adopted(adopted, source)
        return True

    def revocation_adopted(self, revocation: RevocationList, source: str, *, persist: bool = True) -> None:
        """Act on a newly adopted list: keep it in the data dir, drop revoked peers, and say so
        loudly if this node itself is revoked."""
        if persist:
            try:
                write_atomic(self.revocation_path, revocation.pem(), 0o644)
            except StoreError as exc:
                log.error("cannot keep the revocation list: %s (it is in force until restart)", exc)
        dropped = self.membership.purge_revoked()
        log.info("revocation list adopted", extra={"number": revocation.number, "revoked": len(revocation.serials),
                                                   "source": source})
        for peer in dropped:
            log.warning("peer dropped: its certificate is revoked", extra={"peer": peer, "reason": "BAD_CERTIFICATE"})
        self.check_own_revocation()

    def check_own_revocation(self) -> bool:
        """True (and an error logged) when this node's own certificate is on the list in force."""
        revocation = self.trust.revocation
        serial = self.identity.certificate.serial_number
        if revocation is None or not revocation.revokes(serial):
            return False
        log.error("this node's certificate (serial %s) is revoked by the mesh CA (revocation list #%d): every peer "
                  "refuses it; issue a new one with `fednode ca issue --dir PKI %s --addr ...`, install it and "
                  "reload (SIGHUP)", serial_hex(serial), revocation.number, self.node_id)
        return True
