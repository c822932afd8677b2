"""The node's answers to its peers (the server side of the peer protocol).

Every refusal is a `ProtocolError` with a typed reason: it is counted, logged with the peer,
and sent back as a gRPC status; nothing a peer sends can stop the node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import torch

from fednode.errors import ProtocolError, Reason, reason_name
from fednode.node.context import NodeContext
from fednode.node.exchange import open_envelope, receive_update, serve_state
from fednode.node.inbox import Admission
from fednode.security.hello import check_compatible, verify_hello
from fednode.security.revocation import RevokedCertificate
from fednode.store.atomic import sha256_file
from fednode.store.checkpoint import shared_name
from fednode.transport.base import Caller
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)
REVOKED_LOG_EVERY_S = 60.0


class RateLimiter:
    """Token bucket per caller: a flood of Gossip calls costs the flooder, not the node."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str) -> bool:
        now = self.clock()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if len(self._buckets) > 4096:
            self._buckets.clear()
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True


class PeerService:
    def __init__(self, ctx: NodeContext, validate: Callable[[dict[str, torch.Tensor], int], None]):
        self.ctx = ctx
        self.validate = validate
        self.gossip_limit = RateLimiter(rate=20.0, burst=40.0)
        self._shared_sha: dict[str, str] = {}  # shared checkpoint file -> sha256 (files never change)
        self._revoked_logged: dict[str, float] = {}  # revoked caller -> when its refusal was last logged

    def refused(self, exc: ProtocolError, caller: Caller) -> None:
        self.ctx.metrics.reject(reason_name(exc.reason))
        if isinstance(exc, RevokedCertificate):  # a revoked node keeps calling: count each, log once a minute
            now = time.monotonic()
            key = caller.node_id or "?"
            if now - self._revoked_logged.get(key, -REVOKED_LOG_EVERY_S) < REVOKED_LOG_EVERY_S:
                return
            if len(self._revoked_logged) > 4096:
                self._revoked_logged.clear()
            self._revoked_logged[key] = now
        log.warning("refused peer message: %s", exc.detail,
                    extra={"peer": caller.node_id or "?", "reason": reason_name(exc.reason)})

    # Each handler counts and logs its own refusals, so every transport reports them the same way.

    async def _sha(self, path) -> str:
        key = str(path)
        if key not in self._shared_sha:
            if len(self._shared_sha) > 64:
                self._shared_sha.clear()
            self._shared_sha[key] = await asyncio.to_thread(sha256_file, path)
        return self._shared_sha[key]

    def _check_caller(self, caller: Caller) -> None:
        """The TLS layer checked the caller's certificate against the mesh CA, but it cannot see our
        revocation list: refuse a revoked (or otherwise no longer valid) caller here, on every RPC."""
        if caller.certificate_der:
            self.ctx.trust.verify_certificate(caller.certificate_der)

    async def handle_handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello:
        try:
            self._check_caller(caller)
            return await self._handshake(hello, caller)
        except ProtocolError as exc:
            self.refused(exc, caller)
            raise

    async def handle_gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest:
        try:
            self._check_caller(caller)
            return await self._gossip(digest, caller)
        except ProtocolError as exc:
            self.refused(exc, caller)
            raise

    async def handle_push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk],
                          caller: Caller) -> pb.Receipt:
        try:
            self._check_caller(caller)
            return await self._push(start, chunks, caller)
        except ProtocolError as exc:
            self.refused(exc, caller)
            raise

    async def handle_fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]:
        try:
            self._check_caller(caller)
            async for chunk in self._fetch(request, caller):
                yield chunk
        except ProtocolError as exc:
            self.refused(exc, caller)
            raise

    async def _handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello:
        body = verify_hello(self.ctx.trust, hello)
        if caller.node_id is not None and caller.node_id != body.node_id:
            raise ProtocolError(Reason.BAD_CERTIFICATE,
                                f"hello is for {body.node_id!r} but the TLS peer is {caller.node_id!r}")
        check_compatible(self.ctx.own_body, body)
        self.ctx.membership.merge_hello(hello)
        return self.ctx.own_hello

    async def _gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest:
        if not self.gossip_limit.allow(caller.node_id or "?"):
            raise ProtocolError(Reason.RATE_LIMITED, "too many gossip calls: slow down")
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
                               max_payload=ctx.max_payload, kind="update")
        header = opener.header
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
        update = await receive_update(opener, chunks)
        self.validate(update.tensors, update.level)
        if update.weight <= 0 or update.weight != update.weight or update.weight == float("inf"):
            raise ProtocolError(Reason.MALFORMED, f"aggregation weight {update.weight} is not a positive number")
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
            yield chunk
        ctx.metrics.sent(request.requester_id, sent, 0)
