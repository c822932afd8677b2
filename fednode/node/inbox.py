"""Updates that arrived for rounds, and the decision of which round an update may join.

`admit` is the pure rule: an update for the open round or up to `ahead` rounds later is kept;
one round late is still merged (into the open round: a straggler's work is not wasted); older
is refused as STALE_ROUND. The receiver never waits past the round deadline for anybody.
"""

from __future__ import annotations

import asyncio
import enum

from fednode.node.exchange import ReceivedUpdate


class Admission(enum.Enum):
    KEEP = "keep"
    STALE = "stale"
    TOO_EARLY = "too-early"


def admit(update_round: int, open_round: int, *, late: int = 1, ahead: int = 2) -> Admission:
    if update_round < open_round - late:
        return Admission.STALE
    if update_round > open_round + ahead:
        return Admission.TOO_EARLY
    return Admission.KEEP


class Inbox:
    def __init__(self, late: int = 1, ahead: int = 2):
        self.late = late
        self.ahead = ahead
        self.open_round = 1
        self._updates: dict[tuple[int, str], ReceivedUpdate] = {}
        self._changed = asyncio.Condition()

    def check(self, update_round: int) -> Admission:
        return admit(update_round, self.open_round, late=self.late, ahead=self.ahead)

    async def put(self, update: ReceivedUpdate) -> Admission:
        decision = self.check(update.round)
        if decision is Admission.KEEP:
            async with self._changed:
                self._updates[(update.round, update.sender)] = update  # a resend replaces the old one
                self._changed.notify_all()
        return decision

    def senders(self, round_: int) -> set[str]:
        return {sender for (r, sender) in self._updates if r == round_}

    async def wait_for(self, round_: int, expected: set[str], timeout: float) -> set[str]:
        """Wait until every expected sender's update for `round_` is here or the timeout passes."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: expected <= self.senders(round_)), timeout)
            except TimeoutError:
                pass
        return self.senders(round_)

    def take(self, round_: int) -> list[ReceivedUpdate]:
        """Remove and return what merges into `round_` (its own updates and late ones)."""
        keys = [k for k in self._updates if round_ - self.late <= k[0] <= round_]
        taken = [self._updates.pop(k) for k in sorted(keys)]
        newest: dict[str, ReceivedUpdate] = {}
        for update in taken:  # one contribution per sender: the newest round wins
            newest[update.sender] = update
        for k in [k for k in self._updates if k[0] < round_]:
            del self._updates[k]
        return list(newest.values())

    def open(self, round_: int) -> None:
        self.open_round = round_
