"""Per-node Prometheus metrics on a private registry (no global state: many nodes per process
is a supported simulation mode)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# `*_created` series (a timestamp per labelled counter) double the scrape for nothing an alert uses;
# a library-wide switch, idempotent, set before the first registry exists
disable_created_metrics()


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
        self.refused_input = Counter("fednode_refused_peer_input", "A peer's input refused where it is used "
                                     "(catch-up state, merge contribution, negotiation record)",
                                     ["stage", "peer", "reason"], registry=r)
        self.contained_errors = Counter("fednode_contained_errors", "Unexpected errors in a round stage, "
                                        "contained (the round goes on without that input)", ["stage"], registry=r)
        self.last_commit = Gauge("fednode_last_commit_timestamp_seconds", "Unix time of the last committed round",
                                 registry=r)
        self.merged = Gauge("fednode_merged_updates", "Peer updates merged in the last round", registry=r)
        self.tokens_per_s = Gauge("fednode_train_tokens_per_second", "Training tokens per second in the last "
                                  "round", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds
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

    def refusals(self) -> dict[str, int]:
        """Refused peer messages so far, by reason (what a benchmark reports beside its figures)."""
        out: dict[str, int] = {}
        for metric in self.rejected.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.value:
                    out[sample.labels["reason"]] = int(sample.value)
        return out

    def refuse_input(self, stage: str, peer: str, reason: str) -> None:
        """A peer's input refused at `stage` (counted under its reason in rejected_messages as well)."""
        self.refused_input.labels(stage, peer, reason).inc()
        self.reject(reason)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
