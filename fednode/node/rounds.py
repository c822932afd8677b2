"""The round state machine: catch up, train, push, collect, merge, commit.

A round is committed only after its checkpoint is durable (fsync + rename) and its journal row
is written, in that order: a crash at any point leaves the last committed round intact, and a
restart resumes from it. Pushes and the wait for peers share one deadline, so a straggler or a
dead peer never holds a round longer than `round_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from fednode.node.context import NodeContext, Phase
from fednode.node.exchange import fetch_state, push_update
from fednode.node.learner import Contribution, Learner
from fednode.node.negotiator import Negotiator
from fednode.node.schedule import expected_senders, push_targets
from fednode.store.checkpoint import (
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    shared_name,
    write_shared_checkpoint,
)
from fednode.store.journal import RoundRecord
from fednode.transport.base import PeerCallError

log = logging.getLogger(__name__)


class RoundLoop:
    def __init__(self, ctx: NodeContext, learner: Learner, negotiator: Negotiator):
        self.ctx = ctx
        self.learner = learner
        self.negotiator = negotiator
        self.over_budget_streak = 0

    @property
    def target(self) -> int:
        return self.ctx.cfg.train.rounds

    def finished(self) -> bool:
        return self.target > 0 and self.ctx.committed_round >= self.target

    async def run(self) -> None:
        ctx = self.ctx
        while not ctx.draining and not self.finished():
            await self.maybe_catch_up()
            if ctx.draining or self.finished():
                break
            await self.run_round(ctx.committed_round + 1)
        ctx.phase = Phase.DRAINING if ctx.draining else Phase.DONE

    async def maybe_catch_up(self) -> None:
        ctx = self.ctx
        if not self.learner.shares:  # local mode: nothing travels, in either direction
            return
        lag = ctx.cfg.train.catchup_lag
        ahead = sorted((m for m in ctx.membership.live() if m.last_round - ctx.committed_round >= lag),
                       key=lambda m: -m.last_round)
        if not ahead:
            return
        ctx.phase = Phase.CATCHING_UP
        log.info("behind the mesh: fetching state", extra={"round": ctx.committed_round,
                                                          "peer": ahead[0].node_id, "peer_round": ahead[0].last_round})
        try:
            fetched = await fetch_state(ctx.transport, [ctx.recipient(m) for m in ahead], requester=ctx.node_id,
                                        trust=ctx.trust, key=ctx.payload_key,
                                        dest_dir=ctx.cfg.node.data_dir / "incoming",
                                        min_round=ctx.committed_round + 1, max_payload=ctx.max_payload,
                                        timeout=ctx.cfg.train.round_timeout_s)
        except Exception as exc:  # noqa: BLE001 - any failure: keep training locally, try again later
            log.warning("state fetch failed: %s", exc, extra={"round": ctx.committed_round})
            return
        if fetched.round <= ctx.committed_round:
            fetched.path.unlink(missing_ok=True)
            return
        tensors, meta = await asyncio.to_thread(load_checkpoint, fetched.path, fetched.sha256)
        self.learner.adopt_shared(tensors, int(meta.get("level", "0")))
        fetched.path.unlink(missing_ok=True)
        await self._commit(fetched.round, loss_before=math.nan, loss_after=math.nan, tokens=0, bytes_sent=0,
                           bytes_received=fetched.nbytes, merged_from=[], source=f"fetched:{fetched.sender}")
        ctx.metrics.received(fetched.sender, fetched.nbytes, 0)
        log.info("caught up", extra={"round": fetched.round, "peer": fetched.sender})

    async def run_round(self, round_: int) -> None:
        ctx = self.ctx
        ctx.inbox.open(round_)
        self.learner.set_level(self.negotiator.level_for(round_), self.negotiator.committed.growth_seed)
        ctx.phase = Phase.TRAINING
        result = await asyncio.to_thread(self.learner.train_round, round_)
        ctx.metrics.step_time.observe(result.seconds)
        budget = ctx.cfg.budget.step_time_s
        over = budget > 0 and result.seconds / max(result.steps, 1) > budget
        self.over_budget_streak = self.over_budget_streak + 1 if over else 0
        if ctx.draining:
            log.info("round abandoned for drain", extra={"round": round_})
            return
        deadline = time.monotonic() + ctx.cfg.train.round_timeout_s
        updates = []
        bytes_sent = 0
        expected: set[str] = set()
        if self.learner.shares:
            live = ctx.membership.live()
            ids = [m.node_id for m in live]
            by_id = {m.node_id: m for m in live}
            fanout = ctx.cfg.mesh.fanout

            ctx.phase = Phase.PUSHING
            state = self.learner.shared_state()
            targets = [by_id[t] for t in push_targets(round_, ctx.node_id, ids, fanout)]
            bytes_sent = sum(await asyncio.gather(*(self._push(m, state, round_, deadline) for m in targets)))

            ctx.phase = Phase.COLLECTING
            expected = expected_senders(round_, ctx.node_id, ids, fanout)
            await ctx.inbox.wait_for(round_, expected, max(0.0, deadline - time.monotonic()))
            if ctx.draining:
                log.info("round abandoned for drain", extra={"round": round_})
                return
            updates = ctx.inbox.take(round_)

        ctx.phase = Phase.MERGING
        contributions = [Contribution(u.sender, u.tensors, u.weight) for u in updates]
        peer_losses = {n: r.messenger_loss for n, r in self.negotiator.peer_records().items()}
        shared_loss = await asyncio.to_thread(self.learner.merge, contributions, peer_losses)
        missing = sorted(expected - {u.sender for u in updates})
        if missing:
            log.info("round closed without some peers", extra={"round": round_, "missing": ",".join(missing)})
        await self._commit(round_, loss_before=result.loss_before, loss_after=result.loss_after,
                           tokens=result.tokens, bytes_sent=bytes_sent, bytes_received=sum(u.nbytes for u in updates),
                           merged_from=sorted(u.sender for u in updates), source="local")
        signature = await asyncio.to_thread(self.learner.probe_signature)
        self.negotiator.after_round(round_, shared_loss, result.tokens, self.over_budget_streak, signature)
        ctx.metrics.loss.labels("before").set(result.loss_before)
        ctx.metrics.loss.labels("after").set(result.loss_after)
        ctx.metrics.loss.labels("shared").set(shared_loss)
        log.info("round committed", extra={"round": round_, "loss_before": round(result.loss_before, 4),
                                           "loss_after": round(result.loss_after, 4),
                                           "shared_loss": round(shared_loss, 4), "level": self.learner.level,
                                           "merged": len(updates), "sent_bytes": bytes_sent})

    async def _commit(self, round_: int, **fields) -> None:
        """Checkpoint (durable) then journal row; what travels is also written apart, so a peer
        fetching our state never receives our private model."""
        ctx = self.ctx
        ctx.phase = Phase.COMMITTING
        meta = {"round": str(round_), "node": ctx.node_id, "level": str(self.learner.level),
                "mode": self.learner.mode}
        name, sha = await asyncio.to_thread(save_checkpoint, ctx.checkpoint_dir, round_,
                                            self.learner.checkpoint_state(), meta)
        if self.learner.shares:
            await asyncio.to_thread(write_shared_checkpoint, ctx.checkpoint_dir, round_,
                                    self.learner.shared_state(), meta)
        record = RoundRecord(round=round_, epoch=ctx.epoch, level=self.learner.level, checkpoint=name,
                             checkpoint_sha256=sha, committed_unix_ms=int(time.time() * 1000), **fields)
        self.commit(record)

    def commit(self, record: RoundRecord) -> None:
        ctx = self.ctx
        ctx.journal.commit_round(record)
        ctx.committed_round = record.round
        if not math.isnan(record.loss_after):
            ctx.last_loss = record.loss_after
        ctx.metrics.round.set(record.round)
        ctx.membership.tick(last_round=record.round)
        keep = {r.checkpoint for r in ctx.journal.rounds()[-ctx.cfg.train.keep_checkpoints:]}
        prune_checkpoints(ctx.checkpoint_dir, keep | {shared_name(name) for name in keep})

    async def _push(self, member, state, round_: int, deadline: float) -> int:
        ctx = self.ctx
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 0
        try:
            nbytes = await push_update(ctx.transport, ctx.identity, ctx.recipient(member), state, epoch=ctx.epoch,
                                       round_=round_, weight=self.learner.weight(), chunk_size=ctx.chunk_size,
                                       timeout=remaining, level=self.learner.level)
        except PeerCallError as exc:
            ctx.metrics.push_failures.labels(member.node_id).inc()
            log.warning("push failed: %s", exc, extra={"round": round_, "peer": member.node_id})
            return 0
        ctx.metrics.sent(member.node_id, nbytes, -(-nbytes // ctx.chunk_size))
        return nbytes
