"""The node's answers to its peers (the server side of the peer protocol).

Every refusal is a `ProtocolError` with a typed reason: it is counted and logged with the peer
(`fednode.node.gate.PeerGate`, once per call, in the transport's endpoint) and sent back as a typed
status; nothing a peer sends can stop the node. Serve it with `fednode.node.assembly.serve_peers`,
which puts the gate in front of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from fednode.errors import ProtocolError, Reason
from fednode.node.context import NodeContext
from fednode.node.exchange import open_envelope, receive_update, serve_state
from fednode.node.inbox import Admission
from fednode.security import bounds
from fednode.security.hello import check_compatible, verify_hello
from fednode.store.atomic import sha256_file
from fednode.store.checkpoint import shared_name
from fednode.transport.base import Caller
from fednode.v1 import peer_pb2 as pb

if TYPE_CHECKING:  # the learners import torch models: a bare receiver (fednode-bench) does not need them
    from fednode.node.learner import UpdateSpec

log = logging.getLogger(__name__)


class RateLimiter:
    """Token bucket per caller: a flood of calls costs the flooder, not the node (or its other peers).

    Each caller's bucket holds at most `burst` tokens and refills at `rate` per second; a call
    takes one token or is refused. Pure apart from the injected clock; memory is bounded by
    `max_keys` (callers are mesh members, authenticated by TLS, so the key space is small anyway;
    when it is full, the fullest buckets, i.e. the quietest callers, are forgotten first)."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 4096):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate} must be > 0 and burst {burst} >= 1: e.g. rate=20, burst=40")
        self.rate, self.burst, self.clock, self.max_keys = rate, burst, clock, max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when they were counted)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def allow(self, key: str) -> bool:
        now = self.clock()
        tokens = self._tokens(key, now)
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._forget_idle(now)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        return allowed

    def _forget_idle(self, now: float) -> None:
        """Drop the fuller half of the buckets: those callers have been quiet; flooders are kept."""
        by_tokens = sorted(self._buckets, key=lambda k: self._tokens(k, now), reverse=True)
        for k in by_tokens[: max(1, len(by_tokens) // 2)]:
            del self._buckets[k]


GOSSIP_RATE_PER_S = 20.0  # per caller; an honest peer calls at most ~2 times per gossip interval
GOSSIP_RATE_HEADROOM = 10.0  # the limit is at least this many calls per (own) gossip interval
MAX_PUSHES_PER_CALLER = 4  # concurrent PushMessenger streams per caller (an honest one has 1)
PUSH_TIME_SLACK_S = 5.0  # a push may stream for 2 x round_timeout_s + this, then it is cut
MAX_FETCHES_PER_CALLER = 2  # concurrent FetchState streams per caller (an honest one has 1)
FETCH_BURST = 8  # FetchState calls a caller may make at once: one catch-up with its resumes (6 attempts)


def fetch_limiter(round_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
    """FetchState calls per caller: a burst of one catch-up's attempts, refilled over two rounds' deadlines
    (an honest node catches up at most once every `catchup_lag` rounds)."""
    return RateLimiter(rate=FETCH_BURST / (2 * max(round_timeout_s, 1.0)), burst=FETCH_BURST, clock=clock)


def gossip_limiter(gossip_interval_s: float, clock: Callable[[], float] = time.monotonic) -> RateLimiter:
    """The Gossip limit: never below GOSSIP_RATE_PER_S, and at least GOSSIP_RATE_HEADROOM calls per
    gossip interval, so a mesh configured to gossip fast is never limited by its own members."""
    rate = max(GOSSIP_RATE_PER_S, GOSSIP_RATE_HEADROOM / gossip_interval_s)
    return RateLimiter(rate=rate, burst=2 * rate, clock=clock)


def update_size_limit(shapes: Iterable[tuple[int, ...]]) -> int:
    """The most bytes an honest update can announce when its tensors have (at most) these shapes:
    every element at 8 bytes (the widest dtype) plus a generous allowance for the stream's header.
    A header announcing more is refused before any buffer is allocated for it."""
    elements, count = 0, 0
    for shape in shapes:
        elements += math.prod(shape)
        count += 1
    return elements * 8 + 64 * 1024 + 1024 * count


FLOATING = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def check_dtypes(tensors: dict[str, torch.Tensor], allowed: frozenset[torch.dtype]) -> None:
    """Refuse an update holding a tensor of a dtype this node's model does not use: shapes alone do
    not make an update mergeable (an integer tensor of the right shape would stop the merge)."""
    for name, tensor in tensors.items():
        if tensor.dtype not in allowed:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in allowed))
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"tensor {name!r} has dtype "
                                                       f"{str(tensor.dtype).removeprefix('torch.')}, the model "
                                                       f"uses {names}: send the model's own dtype")


class PeerService:
    def __init__(self, ctx: NodeContext, validate: Callable[[dict[str, torch.Tensor], int], None],
                 spec: UpdateSpec | None = None):
        """`validate` and `spec` are the learner's (`learner.validate`, `learner.update_spec()`); with
        no spec (a bare receiver) updates are bounded by [limits] max_payload_mib and floating dtypes."""
        self.ctx = ctx
        self.validate = validate
        self.spec = spec
        self.gossip_limit = gossip_limiter(ctx.cfg.mesh.gossip_interval_s)
        self._pushes: dict[str, int] = {}  # caller -> PushMessenger streams in flight
        self.fetch_limit = fetch_limiter(ctx.cfg.train.round_timeout_s)
        self._limits_for = (ctx.cfg.mesh.gossip_interval_s, ctx.cfg.train.round_timeout_s)
        self._fetches: dict[str, int] = {}  # caller -> FetchState streams in flight
        self._shared_sha: dict[str, str] = {}  # shared checkpoint file -> sha256 (files never change)
        self.gate = ctx.gate  # the node's, served in front of every call; re-checks callers mid-stream

    def refused(self, exc: ProtocolError, caller: Caller) -> None:
        """A refusal made inside a call that did not end it (a gossiped record refused while the
        digest was merged); refusals that end a call are the gate's (`PeerGate.refused`)."""
        self.gate.refused(exc, caller)

    async def _sha(self, path) -> str:
        key = str(path)
        if key not in self._shared_sha:
            if len(self._shared_sha) > 64:
                self._shared_sha.clear()
            self._shared_sha[key] = await asyncio.to_thread(sha256_file, path)
        return self._shared_sha[key]

    # The caller check (`PeerGate.admit`) and the count of every refusal happen once per call in
    # the transport's endpoint (fednode.transport.endpoint), before and around these handlers.

    async def handle_push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk],
                          caller: Caller) -> pb.Receipt:
        with self._push_slot(caller):
            return await self._push(start, chunks, caller)

    @contextlib.contextmanager
    def _push_slot(self, caller: Caller) -> Iterator[None]:
        """At most MAX_PUSHES_PER_CALLER streams per caller at once: each holds a payload buffer."""
        who = caller.node_id or "?"
        if self._pushes.get(who, 0) >= MAX_PUSHES_PER_CALLER:
            self.ctx.metrics.rate_limited.labels("PushMessenger", who).inc()
            raise ProtocolError(Reason.RATE_LIMITED, f"{who} already has {MAX_PUSHES_PER_CALLER} pushes in "
                                                     f"flight: send one update at a time")
        self._pushes[who] = self._pushes.get(who, 0) + 1
        try:
            yield
        finally:
            self._pushes[who] -= 1
            if not self._pushes[who]:
                del self._pushes[who]

    def _follow_reload(self) -> None:
        """The limits are sized from reloadable keys: a reload that makes the mesh gossip faster
        must not leave the node throttling its own members with the old limit."""
        now = (self.ctx.cfg.mesh.gossip_interval_s, self.ctx.cfg.train.round_timeout_s)
        if now != self._limits_for:
            self.gossip_limit, self.fetch_limit = gossip_limiter(now[0]), fetch_limiter(now[1])
            self._limits_for = now

    def update_dtypes(self) -> frozenset[torch.dtype]:
        """Dtypes an update may hold: those of this node's shared state (floating ones if unknown)."""
        return (self.spec.dtypes & FLOATING or FLOATING) if self.spec is not None else FLOATING

    def update_limit(self) -> int:
        """The largest total_size an update may announce here (bytes)."""
        if self.spec is None:
            return self.ctx.max_payload
        return min(self.ctx.max_payload, update_size_limit(self.spec.largest_shapes))  # max_payload_mib reloads

    async def handle_fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]:
        with self._fetch_slot(caller):
            async for chunk in self._fetch(request, caller):
                yield chunk

    @contextlib.contextmanager
    def _fetch_slot(self, caller: Caller) -> Iterator[None]:
        """FetchState per caller: a token bucket (fetch_limiter) and MAX_FETCHES_PER_CALLER at once.
        Each fetch reads and seals a whole state, so a loop of them would cost every other peer."""
        who = caller.node_id or "?"
        self._follow_reload()
        if self._fetches.get(who, 0) >= MAX_FETCHES_PER_CALLER or not self.fetch_limit.allow(who):
            self.ctx.metrics.rate_limited.labels("FetchState", who).inc()
            raise ProtocolError(Reason.RATE_LIMITED, f"too many state fetches from {who} (at most "
                                                     f"{MAX_FETCHES_PER_CALLER} at once, {FETCH_BURST} per "
                                                     f"{FETCH_BURST / self.fetch_limit.rate:g} s): catch up less often")
        self._fetches[who] = self._fetches.get(who, 0) + 1
        try:
            yield
        finally:
            self._fetches[who] -= 1
            if not self._fetches[who]:
                del self._fetches[who]

    async def handle_handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello:
        body = verify_hello(self.ctx.trust, hello)
        if caller.node_id is not None and caller.node_id != body.node_id:
            raise ProtocolError(Reason.BAD_CERTIFICATE,
                                f"hello is for {body.node_id!r} but the TLS peer is {caller.node_id!r}")
        check_compatible(self.ctx.own_body, body)
        self.ctx.membership.merge_hello(hello)
        return self.ctx.own_hello

    async def handle_gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest:
        who = caller.node_id or "?"
        self._follow_reload()
        if not self.gossip_limit.allow(who):
            self.ctx.metrics.rate_limited.labels("Gossip", who).inc()
            raise ProtocolError(Reason.RATE_LIMITED, f"too many gossip calls from {who} (more than "
                                                     f"{self.gossip_limit.rate:g}/s): gossip less often")
        self.ctx.offer_revocation_list(digest.revocation_list, caller.node_id or digest.sender_id or "?")
        outcome = self.ctx.membership.merge(digest)
        for peer, exc in outcome.refused:
            self.refused(exc, Caller(peer))
        return self.ctx.membership.digest()

    async def _push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk], caller: Caller) -> pb.Receipt:
        ctx = self.ctx
        if ctx.draining:
            raise ProtocolError(Reason.NOT_READY, "node is draining")
        opener = open_envelope(start, trust=ctx.trust, node_id=ctx.node_id, key=ctx.payload_key,
                               max_payload=self.update_limit(), kind="update")
        header = opener.header
        bounds.check_weight(header.weight, who=header.sender_id)
        admission = ctx.inbox.check(header.round)
        if admission is Admission.STALE:
            raise ProtocolError(Reason.STALE_ROUND, f"round {header.round} is too old (open round "
                                                    f"{ctx.inbox.open_round})")
        if admission is Admission.TOO_EARLY:
            raise ProtocolError(Reason.NOT_READY, f"round {header.round} is too far ahead (open round "
                                                  f"{ctx.inbox.open_round}): retry later")
        if not ctx.journal.accept_message(header.sender_id, header.epoch, header.round, bytes(header.message_id)):
            raise ProtocolError(Reason.REPLAY, f"message from {header.sender_id} for epoch {header.epoch} round "
                                               f"{header.round} was already accepted or is too old")
        limit_s = 2 * ctx.cfg.train.round_timeout_s + PUSH_TIME_SLACK_S
        try:
            update = await asyncio.wait_for(receive_update(opener, chunks), limit_s)
        except TimeoutError:
            raise ProtocolError(Reason.TRUNCATED, f"update from {header.sender_id} did not finish streaming within "
                                                  f"{limit_s:g} s (2 x round_timeout_s + {PUSH_TIME_SLACK_S:g}): "
                                                  f"the sender must push faster or smaller updates") from None
        self.validate(update.tensors, update.level)
        check_dtypes(update.tensors, self.update_dtypes())
        self.gate.admit(caller)  # revoked while it streamed: never reaches the inbox
        ctx.metrics.received(update.sender, update.nbytes, int(header.chunk_count))
        if await ctx.inbox.put(update) is not Admission.KEEP:  # the round moved on while it streamed
            raise ProtocolError(Reason.STALE_ROUND, f"round {header.round} closed while the update streamed")
        log.debug("update received", extra={"peer": update.sender, "round": update.round, "bytes": update.nbytes})
        return pb.Receipt(accepted=True, bytes_received=update.nbytes)

    async def _fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]:
        ctx = self.ctx
        if caller.node_id is not None and caller.node_id != request.requester_id:
            raise ProtocolError(Reason.BAD_CERTIFICATE, f"request names {request.requester_id!r} but the TLS peer "
                                                        f"is {caller.node_id!r}")
        bounds.check_int("StateRequest min_round", request.min_round, bounds.MAX_ROUND, who=request.requester_id)
        bounds.check_int("StateRequest from_chunk", request.from_chunk, bounds.MAX_CHUNKS, who=request.requester_id)
        member = ctx.membership.members.get(request.requester_id)
        if member is None:
            raise ProtocolError(Reason.UNKNOWN_PEER, f"{request.requester_id!r} is not a known member: "
                                                     f"handshake first")
        # Only what may travel is served: the `.shared` file beside each checkpoint (messenger
        # modes), or the checkpoint itself where the whole model is shared (fedavg).
        candidates = []
        for record in reversed(ctx.journal.rounds()[-ctx.cfg.train.keep_checkpoints:]):
            path = ctx.checkpoint_dir / shared_name(record.checkpoint)
            if path.exists():
                candidates.append((record, path, await self._sha(path)))
        if not candidates:
            raise ProtocolError(Reason.NO_STATE, "no shareable committed state yet")
        resume = next((c for c in candidates if request.content_sha256 and c[2] == request.content_sha256), None)
        record, path, sha = resume or candidates[0]
        if record.round < request.min_round:
            raise ProtocolError(Reason.NO_STATE, f"no committed state at round >= {request.min_round}")
        sent = 0
        async for chunk in serve_state(ctx.identity, ctx.recipient(member), path, sha256=sha, round_=record.round,
                                       epoch=record.epoch, first_chunk=request.from_chunk if resume else 0,
                                       chunk_size=ctx.chunk_size):
            sent += len(chunk.data)
            if chunk.index % 16 == 15:
                self.gate.admit(caller)  # revoked mid-stream: stop serving it
            yield chunk
        ctx.metrics.sent(request.requester_id, sent, 0)
