"""What the parts of a running node share: identity, view of the mesh, store and counters."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.config import Config
from fednode.mesh.membership import Member, Membership
from fednode.node.exchange import Recipient
from fednode.node.inbox import Inbox
from fednode.observability.metrics import NodeMetrics
from fednode.security.envelope import PayloadKey
from fednode.security.pki import NodeIdentity, TrustStore
from fednode.store.journal import Journal
from fednode.transport.base import Transport
from fednode.v1 import peer_pb2 as pb


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
    own_hello: pb.SignedHello
    own_body: pb.HelloBody
    inbox: Inbox = field(default_factory=Inbox)
    phase: Phase = Phase.STARTING
    committed_round: int = 0
    epoch: int = 0
    level: int = 0
    last_loss: float = float("nan")
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    negotiator: Any = None  # fednode.node.negotiator.Negotiator, set once the learner is built
    learner: Any = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id

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
