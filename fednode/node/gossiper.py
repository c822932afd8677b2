"""The membership loop: bump our heartbeat, push-pull digests with a few random peers, and
keep dialling seeds we have not met (so a mesh forms from any one live member)."""

from __future__ import annotations

import asyncio
import logging
import random

from fednode.errors import reason_name
from fednode.node.context import NodeContext
from fednode.security.signed import sign_farewell
from fednode.transport.base import PeerCallError

log = logging.getLogger(__name__)


class Gossiper:
    def __init__(self, ctx: NodeContext, seeds: list[str], rng: random.Random | None = None):
        self.ctx = ctx
        self.seeds: list[str] = []
        self.set_seeds(seeds)
        self.rng = rng or random.Random()
        self.stop = asyncio.Event()
        self._seed_errors: dict[str, str] = {}

    def set_seeds(self, seeds: list[str]) -> None:
        """The addresses dialled until met (a reload may change them)."""
        self.seeds = [s for s in dict.fromkeys(seeds) if s != self.ctx.own_body.address]

    @property
    def interval(self) -> float:
        return self.ctx.cfg.mesh.gossip_interval_s  # read each tick: a reload changes it

    @property
    def fanout(self) -> int:
        return self.ctx.cfg.mesh.fanout

    async def run(self) -> None:
        while not self.stop.is_set():
            await self.tick()
            try:
                await asyncio.wait_for(self.stop.wait(), self.interval)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        ctx = self.ctx
        ctx.membership.tick()
        known = {m.address for m in ctx.membership.members.values()}
        unknown_seeds = [s for s in self.seeds if s not in known]
        peers = ctx.membership.gossip_targets(self.fanout, self.rng)
        await asyncio.gather(*(self.meet(s) for s in unknown_seeds),
                             *(self.exchange(m.address) for m in peers))
        counts = ctx.membership.counts()
        for state, n in counts.items():
            ctx.metrics.peers.labels(state).set(n)

    async def meet(self, address: str) -> None:
        """Handshake with a seed, then exchange digests with it."""
        ctx = self.ctx
        try:
            hello = await ctx.transport.handshake(address, ctx.own_hello, timeout=max(self.interval * 2, 2.0))
        except PeerCallError as exc:
            self._learn_from_refusal(address, exc)
            self._note_seed_error(address, str(exc))
            return
        outcome = ctx.membership.merge_hello(hello)
        for peer, refusal in outcome.refused:
            ctx.metrics.reject(reason_name(refusal.reason))
            self._note_seed_error(address, f"refused {peer}: {refusal}")
        if not outcome.refused:
            self._seed_errors.pop(address, None)
            await self.exchange(address)

    async def exchange(self, address: str) -> None:
        ctx = self.ctx
        try:
            reply = await ctx.transport.gossip(address, ctx.membership.digest(), timeout=max(self.interval * 2, 2.0))
        except PeerCallError as exc:
            self._learn_from_refusal(address, exc)
            log.debug("gossip failed: %s", exc, extra={"address": address})
            return
        ctx.offer_revocation_list(reply.revocation_list, reply.sender_id or address)
        outcome = ctx.membership.merge(reply)
        for peer, refusal in outcome.refused:
            ctx.metrics.reject(reason_name(refusal.reason))
            log.warning("refused peer record: %s", refusal, extra={"peer": peer})

    def _learn_from_refusal(self, address: str, exc: PeerCallError) -> None:
        """A peer that refuses our certificate as revoked sends the revocation list along: adopt it
        (it is checked against the mesh CA like any other), which logs that this node is revoked."""
        if exc.revocation_list:
            self.ctx.offer_revocation_list(exc.revocation_list, address)

    async def say_goodbye(self) -> None:
        """Tell a few peers we are leaving so they stop waiting for us at once."""
        ctx = self.ctx
        ctx.membership.leave(sign_farewell(ctx.identity, ctx.own_body.incarnation))
        targets = ctx.membership.gossip_targets(max(3, self.fanout), self.rng)
        await asyncio.gather(*(self.exchange(m.address) for m in targets))

    def _note_seed_error(self, address: str, message: str) -> None:
        if self._seed_errors.get(address) != message:  # log each distinct failure once, not every tick
            self._seed_errors[address] = message
            level = (logging.ERROR if "MISMATCH" in message
                     else logging.WARNING if "BAD_CERTIFICATE" in message else logging.INFO)
            log.log(level, "seed %s not joined yet: %s", address, message)
