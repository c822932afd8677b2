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
from fednode.node.learner import Learner
from fednode.node.schedule import expected_senders, push_targets
from fednode.store.atomic import fsync_dir
from fednode.store.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from fednode.store.journal import RoundRecord
from fednode.transport.base import PeerCallError

log = logging.getLogger(__name__)


class RoundLoop:
    def __init__(self, ctx: NodeContext, learner: Learner):
        self.ctx = ctx
        self.learner = learner

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
        name = f"round-{fetched.round:08d}.safetensors"
        tensors, _ = await asyncio.to_thread(load_checkpoint, fetched.path, fetched.sha256)
        self.learner.restore(tensors)
        fetched.path.replace(ctx.checkpoint_dir / name)
        fsync_dir(ctx.checkpoint_dir)  # the file must be durable before the journal points at it
        self.commit(RoundRecord(round=fetched.round, epoch=fetched.epoch, level=ctx.level, checkpoint=name,
                                checkpoint_sha256=fetched.sha256, loss_before=math.nan, loss_after=math.nan,
                                tokens=0, bytes_sent=0, bytes_received=fetched.nbytes, merged_from=[],
                                source=f"fetched:{fetched.sender}", committed_unix_ms=int(time.time() * 1000)))
        ctx.metrics.received(fetched.sender, fetched.nbytes, 0)
        log.info("caught up", extra={"round": fetched.round, "peer": fetched.sender})

    async def run_round(self, round_: int) -> None:
        ctx = self.ctx
        ctx.inbox.open(round_)
        ctx.phase = Phase.TRAINING
        result = await asyncio.to_thread(self.learner.train_round, round_)
        ctx.metrics.step_time.observe(result.seconds)
        if ctx.draining:
            log.info("round abandoned for drain", extra={"round": round_})
            return
        deadline = time.monotonic() + ctx.cfg.train.round_timeout_s
        live = ctx.membership.live()
        ids = [m.node_id for m in live]
        by_id = {m.node_id: m for m in live}
        fanout = ctx.cfg.mesh.fanout

        ctx.phase = Phase.PUSHING
        state = self.learner.shared_state()
        targets = [by_id[t] for t in push_targets(round_, ctx.node_id, ids, fanout)]
        results = await asyncio.gather(*(self._push(m, state, round_, deadline) for m in targets))
        bytes_sent = sum(results)

        ctx.phase = Phase.COLLECTING
        expected = expected_senders(round_, ctx.node_id, ids, fanout)
        await ctx.inbox.wait_for(round_, expected, max(0.0, deadline - time.monotonic()))
        if ctx.draining:
            log.info("round abandoned for drain", extra={"round": round_})
            return

        ctx.phase = Phase.MERGING
        updates = ctx.inbox.take(round_)
        contributions = [(u.tensors, u.weight) for u in updates]
        loss_after = await asyncio.to_thread(self.learner.merge, contributions)
        missing = sorted(expected - {u.sender for u in updates})
        if missing:
            log.info("round closed without some peers", extra={"round": round_, "missing": ",".join(missing)})

        ctx.phase = Phase.COMMITTING
        tensors = self.learner.checkpoint_state()
        name, sha = await asyncio.to_thread(save_checkpoint, ctx.checkpoint_dir, round_, tensors,
                                            {"round": str(round_), "node": ctx.node_id})
        self.commit(RoundRecord(round=round_, epoch=ctx.epoch, level=ctx.level, checkpoint=name, checkpoint_sha256=sha,
                                loss_before=result.loss_before, loss_after=loss_after, tokens=result.tokens,
                                bytes_sent=bytes_sent, bytes_received=sum(u.nbytes for u in updates),
                                merged_from=sorted(u.sender for u in updates), source="local",
                                committed_unix_ms=int(time.time() * 1000)))
        ctx.metrics.loss.labels("before").set(result.loss_before)
        ctx.metrics.loss.labels("after").set(loss_after)
        log.info("round committed", extra={"round": round_, "loss_before": round(result.loss_before, 4),
                                           "loss_after": round(loss_after, 4), "merged": len(updates),
                                           "sent_bytes": bytes_sent})

    def commit(self, record: RoundRecord) -> None:
        ctx = self.ctx
        ctx.journal.commit_round(record)
        ctx.committed_round = record.round
        if not math.isnan(record.loss_after):
            ctx.last_loss = record.loss_after
        ctx.metrics.round.set(record.round)
        ctx.membership.tick(last_round=record.round)
        keep = {r.checkpoint for r in ctx.journal.rounds()[-ctx.cfg.train.keep_checkpoints:]}
        prune_checkpoints(ctx.checkpoint_dir, keep)

    async def _push(self, member, state, round_: int, deadline: float) -> int:
        ctx = self.ctx
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 0
        try:
            nbytes = await push_update(ctx.transport, ctx.identity, ctx.recipient(member), state, epoch=ctx.epoch,
                                       round_=round_, weight=self.learner.weight(), chunk_size=ctx.chunk_size,
                                       timeout=remaining)
        except PeerCallError as exc:
            ctx.metrics.push_failures.labels(member.node_id).inc()
            log.warning("push failed: %s", exc, extra={"round": round_, "peer": member.node_id})
            return 0
        ctx.metrics.sent(member.node_id, nbytes, -(-nbytes // ctx.chunk_size))
        return nbytes
