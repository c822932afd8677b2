"""Per-node Prometheus metrics on a private registry (no global state: many nodes per process
is a supported simulation mode)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class NodeMetrics:
    def __init__(self, node_id: str):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.round = Gauge("fednode_round", "Last committed round", registry=r)
        self.epoch = Gauge("fednode_epoch", "Negotiation epoch in force", registry=r)
        self.level = Gauge("fednode_level", "Messenger capacity level in force", registry=r)
        self.peers = Gauge("fednode_peers", "Known peers by liveness state", ["state"], registry=r)
        self.bytes_sent = Counter("fednode_bytes_sent", "Payload bytes sent", ["peer"], registry=r)
        self.bytes_received = Counter("fednode_bytes_received", "Payload bytes received", ["peer"], registry=r)
        self.chunks_sent = Counter("fednode_chunks_sent", "Payload chunks sent", ["peer"], registry=r)
        self.chunks_received = Counter("fednode_chunks_received", "Payload chunks received", ["peer"], registry=r)
        self.rejected = Counter("fednode_rejected_messages", "Peer messages refused", ["reason"], registry=r)
        self.rate_limited = Counter("fednode_rate_limited", "Calls refused because their caller exceeded its "
                                    "rate or concurrency limit", ["rpc", "peer"], registry=r)
        self.push_failures = Counter("fednode_push_failures", "Pushes that did not complete", ["peer"], registry=r)
        self.step_time = Histogram("fednode_round_train_seconds", "Local training time per round", registry=r,
                                   buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.loss = Gauge("fednode_loss", "Held-out loss", ["when"], registry=r)
        self.cert_expiry = Gauge("fednode_certificate_expiry_seconds", "Seconds until the node certificate "
                                 "expires", registry=r)
        # plain totals for the operator service (cheap to read, no label iteration)
        self.total_sent = 0
        self.total_received = 0
        self.total_rejected = 0

    def sent(self, peer: str, nbytes: int, chunks: int) -> None:
        self.bytes_sent.labels(peer).inc(nbytes)
        self.chunks_sent.labels(peer).inc(chunks)
        self.total_sent += nbytes

    def received(self, peer: str, nbytes: int, chunks: int) -> None:
        self.bytes_received.labels(peer).inc(nbytes)
        self.chunks_received.labels(peer).inc(chunks)
        self.total_received += nbytes

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason).inc()
        self.total_rejected += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
