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
import zlib
from dataclasses import replace

from fednode.errors import ProtocolError, Reason, StoreError, reason_name
from fednode.learning.aggregate import TooFar, distance_limit, screen
from fednode.learning.compress import compress
from fednode.learning.merge import MergeRefused
from fednode.node import catchup
from fednode.node.context import NodeContext, Phase
from fednode.node.exchange import fetch_state, push_update
from fednode.node.gate import TIMING_REASONS
from fednode.node.learner import Contribution, Learner, checkpoint_metadata
from fednode.node.negotiator import Negotiator
from fednode.node.peer_service import check_dtypes, update_size_limit
from fednode.node.schedule import expected_senders, push_targets
from fednode.security import bounds
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
SHARED_METADATA = ("round", "epoch", "node", "mode", "level")  # the .shared file's (fetched by peers)


MISSED_ROUNDS_LIMIT = 3  # a peer whose update is missing this many rounds in a row is no longer waited for
MAX_DONORS = 3  # donors tried per catch-up, within one round_timeout_s
BAD_STATE_BLACKLIST_ROUNDS = 10  # x round_timeout_s: a donor that served a bad state is not asked again
FAILED_DONOR_BLACKLIST_ROUNDS = 2  # x round_timeout_s: one that did not deliver in time
CATCHUP_NORM_RATIO = 16.0  # a caught-up state is rounds ahead of ours: only its norm is compared, loosely
FIRST_CONTACT_GOSSIPS = 3  # x gossip_interval_s: the longest a node waits to hear a peer before its first round
CONFIRM_GOSSIPS = 4  # x gossip_interval_s: the longest a fetched state newer than planned waits for signed peers


class RoundLoop:
    def __init__(self, ctx: NodeContext, learner: Learner, negotiator: Negotiator,
                 clock=time.monotonic):
        self.ctx = ctx
        self.learner = learner
        self.negotiator = negotiator
        self.over_budget_streak = 0
        self.clock = clock
        self.missed: dict[str, int] = {}  # peer -> consecutive rounds it was expected and did not arrive
        self.blacklist: dict[str, float] = {}  # donor -> monotonic time it may be asked again
        self.far: dict[str, int] = {}  # peer -> last round its state was refused as too far (none merged since)
        self.missed_activation = False  # an agreement took effect while we were away: re-sync due
        self.far_streak = 0  # rounds in a row whose arrivals were all refused as too far

    @property
    def target(self) -> int:
        return self.ctx.cfg.train.rounds

    # live keys (a reload changes them): read where they are used, never kept
    @property
    def catchup_lag(self) -> int:
        return self.ctx.cfg.train.catchup_lag

    @property
    def keep_checkpoints(self) -> int:
        return self.ctx.cfg.train.keep_checkpoints

    def finished(self) -> bool:
        return self.target > 0 and self.ctx.committed_round >= self.target

    async def run(self) -> None:
        ctx = self.ctx
        await self.hear_the_mesh()
        while not ctx.draining and not self.finished():
            await self.maybe_catch_up()
            if ctx.draining or self.finished():
                break
            await self.run_round(ctx.committed_round + 1)
        ctx.phase = Phase.DRAINING if ctx.draining else Phase.DONE

    # ------------------------------------------------------------------ catch-up

    async def hear_the_mesh(self) -> None:
        """Before the first round, wait (bounded) to hear a peer's signed round: a node joining a
        running mesh then catches up at once instead of training and pushing a round the mesh left
        long ago (refused STALE_ROUND at both ends, a round lost). A fresh mesh (nobody has
        committed, so nobody has signed a round) and a node whose seeds are down start after the
        bound; a node with no seeds at once."""
        ctx = self.ctx
        if not self.learner.shares or not ctx.cfg.mesh.seeds:
            return
        deadline = self.clock() + FIRST_CONTACT_GOSSIPS * ctx.cfg.mesh.gossip_interval_s
        while not ctx.draining and self.clock() < deadline:
            if any(r > ctx.committed_round for n, r in self.signed_rounds().items() if n != ctx.node_id):
                return
            await asyncio.sleep(0.05)

    def signed_rounds(self) -> dict[str, int]:
        """Live peers' committed rounds as they signed them (their NegotiationRecord), never the
        unsigned last_round of gossip."""
        return {m.node_id: int(m.negotiation.round) for m in self.ctx.membership.live() if m.negotiation is not None}

    def blacklisted(self) -> set[str]:
        now = self.clock()
        self.blacklist = {k: t for k, t in self.blacklist.items() if t > now}
        return set(self.blacklist)

    def _blacklist(self, donor: str, rounds: int) -> None:
        self.blacklist[donor] = self.clock() + rounds * self.ctx.cfg.train.round_timeout_s

    def state_limit(self) -> int:
        """The largest state a donor may announce: the model's largest shareable state."""
        return min(update_size_limit(self.learner.update_spec().largest_shapes), self.ctx.max_payload)

    async def maybe_catch_up(self) -> None:
        ctx = self.ctx
        if not self.learner.shares:  # local mode: nothing travels, in either direction
            return
        claims = self.signed_rounds()
        heard = self.negotiator.take_heard_late()
        if heard is not None and catchup.missed_activation(heard.activate_round, heard.level, self.learner.level,
                                                           ctx.committed_round):
            self.missed_activation = True  # until a donor's state is adopted (its fetch may fail for now)
        missed = self.missed_activation
        resync = missed or catchup.diverged(self.far, ctx.committed_round, len(claims)) \
            or self.far_streak >= catchup.ISOLATED_ROUNDS
        plan = catchup.plan(ctx.committed_round, 0 if resync else self.catchup_lag, claims,
                            self.blacklisted())
        if plan is None:
            return
        ctx.phase = Phase.CATCHING_UP
        by_id = {m.node_id: m for m in ctx.membership.live()}
        why = ("missed the activation of the mesh's agreement: fetching state" if missed else
               "diverged from the mesh (peers' states all too far): fetching state" if resync else
               "behind the mesh: fetching state")
        log.info(why, extra={"round": ctx.committed_round, "peer": plan.donors[0], "peer_round": plan.target,
                             "peers": ",".join(self.far)})
        deadline = self.clock() + ctx.cfg.train.round_timeout_s  # one deadline for every donor together
        for donor in plan.donors[:MAX_DONORS]:
            remaining = deadline - self.clock()
            if remaining <= 0 or ctx.draining or donor not in by_id:
                break
            try:
                done = await self._catch_up_from(by_id[donor], plan, remaining, resync=resync)
            except StoreError:
                raise  # our own disk failed, not the donor
            except Exception as exc:  # noqa: BLE001 - any other failure: that donor's, counted; try the next
                ctx.metrics.contained_errors.labels("catch-up").inc()
                log.warning("catch-up from a donor failed: %s", exc, extra={"peer": donor})
                self._blacklist(donor, FAILED_DONOR_BLACKLIST_ROUNDS)
                continue
            if done:
                return

    async def _catch_up_from(self, member, plan: catchup.CatchUpPlan, timeout: float, *, resync: bool = False) -> bool:
        """Fetch, validate and adopt one donor's state; False (donor counted and blacklisted) if refused.
        Re-syncing (`resync`: we diverged, not behind) a state no newer than ours replaces our shared
        state without a journal row: committed rounds are never rewritten."""
        ctx = self.ctx
        donor = member.node_id
        deadline = self.clock() + timeout
        own_round = ctx.committed_round
        try:
            fetched = await fetch_state(ctx.transport, [ctx.recipient(member)], requester=ctx.node_id,
                                        trust=ctx.trust, key=ctx.payload_key,
                                        dest_dir=ctx.cfg.node.data_dir / "incoming",
                                        min_round=min(own_round, plan.target - 1) + 1 if resync else own_round + 1,
                                        max_payload=self.state_limit(),
                                        timeout=timeout)
        except (PeerCallError, ProtocolError) as exc:
            reason = reason_name(exc.reason) if exc.reason else "UNAVAILABLE"
            level = logging.INFO if exc.reason in TIMING_REASONS else logging.WARNING
            log.log(level, "state fetch failed: %s", exc, extra={"round": ctx.committed_round, "peer": donor,
                                                                 "reason": reason})
            if isinstance(exc, ProtocolError):
                ctx.metrics.refuse_input("catch-up", donor, reason)
            self._blacklist(donor, FAILED_DONOR_BLACKLIST_ROUNDS)
            return False
        try:
            if fetched.sender != donor:
                raise ProtocolError(Reason.BAD_CERTIFICATE, f"state asked of {donor} is signed by {fetched.sender}")
            if fetched.round > plan.max_round and await self._confirmed(fetched.round, plan, deadline):
                plan = replace(plan, max_round=fetched.round)
            if not catchup.acceptable_round(fetched.round, own_round, plan, resync=resync):
                raise ProtocolError(Reason.MALFORMED, f"state labelled round {fetched.round}: signed peers confirm "
                                                      f"round {plan.target} (at most {plan.max_round} accepted)")
            try:
                tensors, meta = await asyncio.to_thread(load_checkpoint, fetched.path, fetched.sha256)
            except StoreError as exc:  # the donor's bytes, not our disk: its file does not load
                raise ProtocolError(Reason.MALFORMED, f"state does not load as a checkpoint ({exc})") from None
            level = await asyncio.to_thread(self._validate_state, tensors, meta)
        except ProtocolError as exc:
            fetched.path.unlink(missing_ok=True)
            ctx.metrics.refuse_input("catch-up", donor, reason_name(exc.reason))
            log.warning("refused a caught-up state: %s", exc.detail,
                        extra={"peer": donor, "reason": reason_name(exc.reason), "round": fetched.round})
            self._blacklist(donor, BAD_STATE_BLACKLIST_ROUNDS)
            return False
        fetched.path.unlink(missing_ok=True)
        self.learner.adopt_shared(tensors, level)
        self.far.clear()
        self.missed_activation = False
        self.far_streak = 0
        ctx.metrics.received(fetched.sender, fetched.nbytes, 0)
        if fetched.round <= own_round:  # re-synced in step: the next round trains from the mesh's state
            log.info("re-synced with the mesh", extra={"round": own_round, "peer": fetched.sender,
                                                      "peer_round": fetched.round})
            return True
        await self._commit(fetched.round, loss_before=math.nan, loss_after=math.nan, tokens=0, bytes_sent=0,
                           bytes_received=fetched.nbytes, merged_from=[], source=f"fetched:{fetched.sender}")
        log.info("caught up", extra={"round": fetched.round, "peer": fetched.sender})
        return True

    async def _confirmed(self, fetched_round: int, plan: catchup.CatchUpPlan, deadline: float) -> bool:
        """Wait (bounded) for signed peers to confirm a state newer than the plan allowed: an honest
        donor's, when the mesh moved on while we planned from claims a gossip old (refusing it left
        a lagger racing alone, its donors blacklisted); a liar's label is never confirmed."""
        limit = min(deadline, self.clock() + CONFIRM_GOSSIPS * self.ctx.cfg.mesh.gossip_interval_s)
        while not catchup.confirms(fetched_round, self.signed_rounds(), plan):
            if self.ctx.draining or self.clock() >= limit:
                return False
            await asyncio.sleep(0.05)
        return True

    def _validate_state(self, tensors, meta: dict[str, str]) -> int:
        """The same checks as an update (level, shapes, dtypes, finite, norm) plus distance from our own
        state; returns the state's level. ProtocolError when refused."""
        try:
            level = int(str(meta.get("level", "0"))[:8])
        except ValueError:
            raise ProtocolError(Reason.MALFORMED, f"state level {str(meta.get('level'))[:20]!r} is not a number") \
                from None
        bounds.check_int("state level", level, bounds.MAX_LEVEL)
        self.learner.validate(tensors, level)
        own = self.learner.shared_state()
        check_dtypes(tensors, frozenset(t.dtype for t in own.values()))
        screen(own, tensors, norm_ratio=CATCHUP_NORM_RATIO, distance_limit=None)
        return level

    async def run_round(self, round_: int) -> None:
        ctx = self.ctx
        ctx.inbox.open(round_)
        self.learner.set_level(self.negotiator.level_for(round_), self.negotiator.committed.growth_seed)
        # what we train from: the merge screens peers' states by how far one round of training moves
        start = self.learner.shared_state() if self.learner.shares else None  # a snapshot (state_tensors copies)
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
            targets = [by_id[t] for t in push_targets(round_, ctx.node_id, ids, fanout)]
            wire = await asyncio.to_thread(compress, self.learner.shared_state(), ctx.cfg.learning.update_codec,
                                           zlib.crc32(f"{ctx.node_id}/{round_}".encode()))  # rounding draws
            bytes_sent = sum(await asyncio.gather(*(self._push(m, wire, round_, deadline) for m in targets)))

            ctx.phase = Phase.COLLECTING
            expected = expected_senders(round_, ctx.node_id, ids, fanout)
            waited = {p for p in expected if self.missed.get(p, 0) < MISSED_ROUNDS_LIMIT}
            others = {n: r for n, r in self.signed_rounds().items() if n != ctx.node_id}
            if expected and not waited and catchup.ahead_of_mesh(round_, others):
                waited = expected  # we ran ahead of everyone: wait for the mesh, do not race on alone
            await ctx.inbox.wait_for(round_, waited, max(0.0, deadline - time.monotonic()))
            if ctx.draining:
                log.info("round abandoned for drain", extra={"round": round_})
                return
            updates = self._admissible(ctx.inbox.take(round_), round_)
            arrived = {u.sender for u in updates}
            for peer in expected | arrived:
                self.missed[peer] = 0 if peer in arrived else self.missed.get(peer, 0) + 1
            if len(self.missed) > 4 * max(len(ids), 1) + 64:  # forget peers long gone
                self.missed = {p: n for p, n in self.missed.items() if p in by_id or p in arrived}

        ctx.phase = Phase.MERGING
        shared_loss = await self._merge(round_, updates, start)
        missing = sorted(expected - {u.sender for u in updates})
        if missing:
            log.info("round closed without some peers", extra={"round": round_, "missing": ",".join(missing)})
        await self._commit(round_, loss_before=result.loss_before, loss_after=result.loss_after,
                           tokens=result.tokens, bytes_sent=bytes_sent, bytes_received=sum(u.nbytes for u in updates),
                           merged_from=sorted(u.sender for u in updates), source="local")
        signature = await asyncio.to_thread(self.learner.probe_signature)
        try:
            self.negotiator.after_round(round_, shared_loss, result.tokens, self.over_budget_streak, signature)
        except StoreError:
            raise  # our own journal failed
        except Exception as exc:  # noqa: BLE001 - negotiation reads peers' records: never stop the round loop
            ctx.metrics.contained_errors.labels("negotiation").inc()
            log.error("negotiation step failed (round committed, agreement unchanged): %s", exc,
                      extra={"round": round_})
        ctx.metrics.loss.labels("before").set(result.loss_before)
        ctx.metrics.loss.labels("after").set(result.loss_after)
        ctx.metrics.loss.labels("shared").set(shared_loss)
        ctx.metrics.last_commit.set(time.time())
        ctx.metrics.merged.set(len(updates))
        if result.seconds > 0:
            ctx.metrics.tokens_per_s.set(result.tokens / result.seconds)
        log.info("round committed", extra={"round": round_, "loss_before": round(result.loss_before, 4),
                                           "loss_after": round(result.loss_after, 4),
                                           "shared_loss": round(shared_loss, 4), "messenger_level": self.learner.level,
                                           "merged": len(updates), "sent_bytes": bytes_sent})

    def _admissible(self, updates: list, round_: int) -> list:
        """Drop what must not merge any more: updates from a certificate revoked since they arrived."""
        kept = []
        for u in updates:
            if u.certificate_der and self.ctx.trust.is_revoked(u.certificate_der):
                self.ctx.metrics.refuse_input("merge", u.sender, reason_name(Reason.BAD_CERTIFICATE))
                log.warning("dropped an update: its sender was revoked after it arrived",
                            extra={"peer": u.sender, "round": round_, "reason": "BAD_CERTIFICATE"})
                continue
            kept.append(u)
        return kept

    async def _merge(self, round_: int, updates: list, start: dict | None) -> float:
        """Screen each update against our own state (`start`: what we trained from this round), merge
        the rest; a merge that fails or is refused keeps our own state (counted, peers logged) and the
        round still commits."""
        ctx = self.ctx
        own = self.learner.shared_state()
        contributions = []
        far = []
        limit = await asyncio.to_thread(distance_limit, own, start, [u.tensors for u in updates]) if updates else None
        for u in updates:
            try:
                await asyncio.to_thread(screen, own, u.tensors, distance_limit=limit)
            except ProtocolError as exc:
                ctx.metrics.refuse_input("merge", u.sender, reason_name(exc.reason))
                log.warning("refused an update at merge: %s", exc.detail,
                            extra={"peer": u.sender, "round": round_, "reason": reason_name(exc.reason)})
                if isinstance(exc, TooFar):
                    far.append(u.sender)
                continue
            contributions.append(Contribution(u.sender, u.tensors, u.weight))
        if contributions:
            self.far.clear()  # we merged with the mesh: in step with it
        self.far.update(dict.fromkeys(far, round_))
        # rounds in a row where something arrived, all of it too far, nothing merged
        self.far_streak = catchup.next_far_streak(self.far_streak, bool(far), bool(contributions))
        peer_losses = {n: r.messenger_loss for n, r in self.negotiator.peer_records().items()}
        try:
            return await asyncio.to_thread(self.learner.merge, contributions, peer_losses)
        except Exception as exc:  # noqa: BLE001 - peers' tensors went in: contain it, keep our own state
            named = exc.peers if isinstance(exc, MergeRefused) else []
            peers = ",".join(named or sorted(c.sender for c in contributions))
            reason = reason_name(exc.reason) if isinstance(exc, ProtocolError) else "MERGE_FAILED"
            if isinstance(exc, MergeRefused):
                ctx.metrics.reject(reason)
            ctx.metrics.contained_errors.labels("merge").inc()
            log.error("merge refused, own state kept: %s", exc, extra={"round": round_, "peers": peers,
                                                                       "reason": reason})
            try:
                return await asyncio.to_thread(self.learner.merge, [], peer_losses)
            except Exception:  # noqa: BLE001
                return math.nan

    async def _commit(self, round_: int, **fields) -> None:
        """Checkpoint (durable) then journal row; what travels is also written apart, so a peer
        fetching our state never receives our private model."""
        ctx = self.ctx
        ctx.phase = Phase.COMMITTING
        meta = checkpoint_metadata(ctx.cfg, self.learner, round_, ctx.epoch)
        name, sha = await asyncio.to_thread(save_checkpoint, ctx.checkpoint_dir, round_,
                                            self.learner.checkpoint_state(), meta)
        if self.learner.shares:  # served to peers: what they need to adopt it, nothing about P or this site
            shared_meta = {k: meta[k] for k in SHARED_METADATA}
            await asyncio.to_thread(write_shared_checkpoint, ctx.checkpoint_dir, round_,
                                    self.learner.shared_state(), shared_meta)
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
        keep = {r.checkpoint for r in ctx.journal.rounds()[-self.keep_checkpoints:]}
        prune_checkpoints(ctx.checkpoint_dir, keep | {shared_name(name) for name in keep})

    async def _push(self, member, wire: tuple[dict, dict[str, str]], round_: int, deadline: float) -> int:
        ctx = self.ctx
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 0
        try:
            tensors, metadata = wire
            nbytes = await push_update(ctx.transport, ctx.identity, ctx.recipient(member), tensors, epoch=ctx.epoch,
                                       round_=round_, weight=self.learner.weight(), chunk_size=ctx.chunk_size,
                                       timeout=remaining, level=self.learner.level, metadata=metadata)
        except PeerCallError as exc:
            ctx.metrics.push_failures.labels(member.node_id).inc()
            timing = exc.reason in (Reason.STALE_ROUND, Reason.NOT_READY)  # the peer is behind, ahead or leaving
            log.log(logging.INFO if timing else logging.WARNING, "push failed: %s", exc,
                    extra={"round": round_, "peer": member.node_id})
            return 0
        ctx.metrics.sent(member.node_id, nbytes, -(-nbytes // ctx.chunk_size))
        return nbytes
