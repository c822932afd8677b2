"""Per-caller rate limits: the token bucket itself (pure, fake clock), the Gossip limit derived from
the gossip interval (never limits an honest mesh), and the node's gossip handler refusing a flood
from one peer with RATE_LIMITED, counted, while other peers are served. (The same flood over real
gRPC against a running daemon: tests/test_hostile_network.py.)"""

from __future__ import annotations

import asyncio
import tomllib

import pytest
from helpers_pki import UNCHAINED, make_mesh

from fednode.config import parse_config, to_toml
from fednode.errors import ProtocolError, Reason
from fednode.mesh.membership import Membership
from fednode.node.context import NodeContext
from fednode.node.peer_service import (
    GOSSIP_RATE_PER_S,
    MAX_PUSHES_PER_CALLER,
    PeerService,
    RateLimiter,
    gossip_limiter,
)
from fednode.observability.metrics import NodeMetrics
from fednode.security.envelope import PayloadKey
from fednode.security.hello import sign_hello
from fednode.security.trust import TrustStore
from fednode.store.journal import Journal
from fednode.transport.base import Caller
from fednode.transport.endpoint import PeerEndpoint
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.v1 import peer_pb2 as pb


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------- the bucket


def test_a_burst_is_allowed_then_refused_until_tokens_refill():
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=5.0, clock=clock)
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.49  # less than one token back
    assert not limiter.allow("a")
    clock.now += 0.02  # 0.51 s at 2/s: one token
    assert limiter.allow("a") and not limiter.allow("a")
    clock.now += 100  # refills to the burst, never above it
    assert sum(limiter.allow("a") for _ in range(10)) == 5


def test_callers_have_separate_buckets():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=3.0, clock=clock)
    for _ in range(10):
        limiter.allow("flooder")
    assert not limiter.allow("flooder")
    assert all(limiter.allow("honest") for _ in range(3))


def test_refused_calls_do_not_dig_the_bucket_deeper():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1.0, clock=clock)
    assert limiter.allow("a")
    for _ in range(1000):  # a flooder that keeps calling still gets its next token after 1 s
        assert not limiter.allow("a")
    clock.now += 1.0
    assert limiter.allow("a")


def test_a_clock_going_backwards_grants_nothing():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=1.0, clock=clock)
    assert limiter.allow("a")
    clock.now -= 50
    assert not limiter.allow("a")


def test_memory_is_bounded_and_a_flooder_is_not_forgotten_by_churn():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=2.0, clock=clock, max_keys=64)
    for _ in range(5):
        limiter.allow("flooder")
    for i in range(10_000):  # many one-off callers: idle (full) buckets are dropped first
        limiter.allow(f"once-{i}")
        assert len(limiter._buckets) <= 64
    assert not limiter.allow("flooder")


@pytest.mark.parametrize("rate, burst", [(0, 1), (-1, 5), (1, 0.5)])
def test_nonsense_parameters_are_refused(rate, burst):
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate=rate, burst=burst)


@pytest.mark.parametrize("interval", [0.01, 0.05, 0.3, 1.0, 5.0])
def test_the_gossip_limit_never_limits_an_honest_peer(interval):
    # an honest peer calls a given node at most twice per tick (meet a seed + exchange), and a slow
    # tick can bunch two ticks together: 4 calls at once, every interval, for 2000 intervals
    clock = Clock()
    limiter = gossip_limiter(interval, clock=clock)
    for _ in range(2000):
        assert all(limiter.allow("honest") for _ in range(4))
        clock.now += interval
    assert limiter.rate >= GOSSIP_RATE_PER_S


def test_the_gossip_limit_stops_a_flood():
    clock = Clock()
    limiter = gossip_limiter(1.0, clock=clock)
    allowed = 0
    for _ in range(10):  # one second of 1000 calls per second
        allowed += sum(limiter.allow("flooder") for _ in range(100))
        clock.now += 0.1
    assert allowed <= 2 * GOSSIP_RATE_PER_S + GOSSIP_RATE_PER_S + 1  # the burst + one second of refill


# ------------------------------------------------------------------------------- the node's handler


def _service(tmp_path):
    ids = make_mesh(tmp_path / "pki", ("a", "b", "c"))
    cfg = parse_config(tomllib.loads(to_toml({"node": {"name": "a", "data_dir": str(tmp_path / "a"),
                                                        "listen": "mem:1"}})), tmp_path)
    body = pb.HelloBody(node_id="a", protocol_version=1, tokenizer_hash="t", family_hash="f",
                        payload_public_key=PayloadKey.generate().public_bytes(), address="mem:1", incarnation=1,
                        **UNCHAINED)
    own = sign_hello(ids["a"], body)
    trust = TrustStore(ids["a"].ca_pem)
    ctx = NodeContext(cfg, ids["a"], trust, PayloadKey.generate(), Journal.open(tmp_path / "a" / "journal.db"),
                      Membership(own, body, trust, suspect_after=5, dead_after=10),
                      MemoryTransport(MemoryNetwork(), "a"), NodeMetrics("a"))
    service = PeerService(ctx, lambda tensors, level: None)
    return ctx, service


def _sample(ctx, name: str, **labels) -> float:
    return ctx.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_reloaded_gossip_interval_resizes_the_limits(tmp_path):
    """Reloading a faster [mesh] gossip_interval_s (a live key) must not leave the limiter built at
    start throttling the node's own members."""
    import dataclasses

    ctx, service = _service(tmp_path)
    old = service.gossip_limit.rate
    faster = dataclasses.replace(ctx.cfg.mesh, gossip_interval_s=ctx.cfg.mesh.gossip_interval_s / 20)
    ctx.cfg = dataclasses.replace(ctx.cfg, mesh=faster)
    asyncio.run(service.handle_gossip(pb.Digest(sender_id="b"), Caller("b")))
    assert service.gossip_limit.rate > old
    assert service.gossip_limit.rate >= gossip_limiter(faster.gossip_interval_s).rate


def test_a_gossip_flood_from_one_peer_is_refused_counted_and_others_are_served(tmp_path):
    ctx, service = _service(tmp_path)
    clock = Clock()
    service.gossip_limit = gossip_limiter(ctx.cfg.mesh.gossip_interval_s, clock=clock)
    served = PeerEndpoint(service, ctx.gate)  # as every transport serves it

    async def flood() -> tuple[int, int]:
        ok = refused = 0
        for _ in range(500):
            try:
                await served.gossip(pb.Digest(sender_id="b"), Caller("b"))
                ok += 1
            except ProtocolError as exc:
                assert exc.reason == Reason.RATE_LIMITED and "gossip less often" in str(exc)
                refused += 1
        reply = await served.gossip(pb.Digest(sender_id="c"), Caller("c"))  # another peer: served
        assert reply.sender_id == "a"
        return ok, refused

    try:
        ok, refused = asyncio.run(flood())
        assert ok == int(service.gossip_limit.burst) and refused == 500 - ok
        assert _sample(ctx, "fednode_rejected_messages_total", reason="RATE_LIMITED") == refused
        assert _sample(ctx, "fednode_rate_limited_total", rpc="Gossip", peer="b") == refused
        assert _sample(ctx, "fednode_rate_limited_total", rpc="Gossip", peer="c") == 0
        clock.now += 1.0  # the flooder is served again once it slows down
        asyncio.run(service.handle_gossip(pb.Digest(sender_id="b"), Caller("b")))
    finally:
        ctx.journal.close()


def test_concurrent_pushes_per_caller_are_bounded(tmp_path):
    ctx, service = _service(tmp_path)
    release = asyncio.Event

    async def scenario() -> list[str]:
        gate = release()
        started = 0

        async def slow_push(start, chunks, caller):
            nonlocal started
            started += 1
            await gate.wait()
            return pb.Receipt(accepted=True)

        service._push = slow_push  # the admission slot is what is under test, not the envelope
        calls = [asyncio.create_task(service.handle_push(pb.EnvelopeStart(), _no_chunks(), Caller("b")))
                 for _ in range(MAX_PUSHES_PER_CALLER + 2)]
        other = asyncio.create_task(service.handle_push(pb.EnvelopeStart(), _no_chunks(), Caller("c")))
        while started < MAX_PUSHES_PER_CALLER + 1:
            await asyncio.sleep(0.01)
        gate.set()
        outcomes = await asyncio.gather(*calls, other, return_exceptions=True)
        again = await service.handle_push(pb.EnvelopeStart(), _no_chunks(), Caller("b"))  # slots were released
        assert again.accepted and not service._pushes
        return [Reason.Name(o.reason) if isinstance(o, ProtocolError) else "ok" for o in outcomes]

    try:
        outcomes = asyncio.run(asyncio.wait_for(scenario(), 10))
        assert outcomes == ["ok"] * MAX_PUSHES_PER_CALLER + ["RATE_LIMITED"] * 2 + ["ok"]
        assert _sample(ctx, "fednode_rate_limited_total", rpc="PushMessenger", peer="b") == 2
    finally:
        ctx.journal.close()


async def _no_chunks():
    return
    yield
