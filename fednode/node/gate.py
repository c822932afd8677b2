"""The node's gate on every peer call (a `fednode.transport.base.CallGate`), whatever the RPC or
the transport: the caller's certificate is checked against the trust store before any handler runs
(TLS checked it against the mesh CA, but cannot see our revocation list), and every refusal a call
ends in is counted and logged once, with the peer.
"""

from __future__ import annotations

import logging
import time

from fednode.errors import ProtocolError, Reason, reason_name
from fednode.observability.metrics import NodeMetrics
from fednode.security.revocation import RevokedCertificate
from fednode.security.trust import TrustStore
from fednode.transport.base import Caller

log = logging.getLogger(__name__)
REVOKED_LOG_EVERY_S = 60.0

# Mesh timing, not a fault: a round the receiver has left or not reached yet (a joiner catching up,
# a straggler), a member whose hello has not reached us yet (a joiner that heard of us by gossip
# and asks for state before its handshake lands). Counted like every refusal, logged without alarm.
TIMING_REASONS = frozenset({Reason.STALE_ROUND, Reason.NOT_READY, Reason.UNKNOWN_PEER})


# Refusals a caller can repeat faster than the rate limits allow them: a revoked node keeps calling,
# a flooder floods, and a request that does not decode is refused before the rate limiter runs.
QUIET_REASONS = frozenset({Reason.RATE_LIMITED, Reason.MALFORMED})


class RefusalLog:
    """Counts every refusal (`fednode_rejected_messages_total` by reason) and logs it with the peer;
    those a caller can repeat at will (revoked, QUIET_REASONS) are counted each time but logged once
    a minute per (peer, reason), so one member cannot flood the node's log."""

    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics
        self._quiet_logged: dict[tuple[str, int], float] = {}  # (peer, reason) -> when last logged

    def __call__(self, exc: ProtocolError, peer: str | None) -> None:
        self.metrics.reject(reason_name(exc.reason))
        if isinstance(exc, RevokedCertificate) or exc.reason in QUIET_REASONS:
            now = time.monotonic()
            key = (peer or "?", exc.reason)
            if now - self._quiet_logged.get(key, -REVOKED_LOG_EVERY_S) < REVOKED_LOG_EVERY_S:
                return
            if len(self._quiet_logged) > 4096:
                self._quiet_logged.clear()
            self._quiet_logged[key] = now
        level = logging.INFO if exc.reason in TIMING_REASONS else logging.WARNING
        log.log(level, "refused peer message: %s", exc.detail,
                extra={"peer": peer or "?", "reason": reason_name(exc.reason)})


class PeerGate:
    """Admits a caller whose certificate the trust store still accepts; logs every refusal."""

    def __init__(self, trust: TrustStore, metrics: NodeMetrics):
        self.trust = trust
        self.log = RefusalLog(metrics)

    def admit(self, caller: Caller) -> None:
        """Raises `RevokedCertificate` (with the list, for the caller) or another BAD_CERTIFICATE
        refusal, also when the certificate names another node than the one TLS authenticated. A
        caller without TLS (the in-memory twin: certificate None) has nothing to check."""
        if caller.certificate_der is None:
            return
        if not caller.certificate_der:
            raise ProtocolError(Reason.BAD_CERTIFICATE, f"the TLS certificate of caller {caller.node_id or '?'} "
                                                        f"cannot be read: present a PEM/DER X.509 certificate")
        name = self.trust.verify_certificate(caller.certificate_der)
        if caller.node_id is not None and name != caller.node_id:
            raise ProtocolError(Reason.BAD_CERTIFICATE, f"the caller's TLS name {caller.node_id!r} is not its "
                                                        f"certificate's {name!r}: one certificate per node")

    def refused(self, exc: ProtocolError, caller: Caller) -> None:
        self.log(exc, caller.node_id)
