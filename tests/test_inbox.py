"""Round inbox: which rounds an update may join, one contribution per sender, waiting for senders."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from fednode.node.exchange import ReceivedUpdate
from fednode.node.inbox import Admission, Inbox, admit


def update(sender: str, round_: int, value: float = 0.0) -> ReceivedUpdate:
    return ReceivedUpdate(sender=sender, epoch=1, round=round_, weight=1.0,
                          tensors={"w": torch.full((2,), value)}, nbytes=8)


@pytest.mark.parametrize(("update_round", "expect"), [
    (1, Admission.STALE), (8, Admission.STALE), (9, Admission.KEEP),  # late by 1 is still merged
    (10, Admission.KEEP), (11, Admission.KEEP), (12, Admission.KEEP),  # ahead by <= 2 is kept
    (13, Admission.TOO_EARLY), (100, Admission.TOO_EARLY),
])
def test_admit_table(update_round, expect):
    assert admit(update_round, 10) is expect


def test_admit_honours_custom_windows():
    assert admit(7, 10, late=3) is Admission.KEEP
    assert admit(6, 10, late=3) is Admission.STALE
    assert admit(10, 10, late=0, ahead=0) is Admission.KEEP
    assert admit(9, 10, late=0, ahead=0) is Admission.STALE
    assert admit(11, 10, late=0, ahead=0) is Admission.TOO_EARLY


def test_put_admits_by_the_open_round_and_keeps_only_admitted():
    async def scenario():
        inbox = Inbox()
        inbox.open(5)
        assert inbox.check(3) is Admission.STALE
        assert await inbox.put(update("old", 3)) is Admission.STALE
        assert await inbox.put(update("early", 8)) is Admission.TOO_EARLY
        assert await inbox.put(update("late", 4)) is Admission.KEEP
        assert await inbox.put(update("now", 5)) is Admission.KEEP
        assert await inbox.put(update("ahead", 7)) is Admission.KEEP
        assert inbox.senders(3) == set() and inbox.senders(8) == set()
        assert inbox.senders(4) == {"late"} and inbox.senders(5) == {"now"} and inbox.senders(7) == {"ahead"}
    asyncio.run(scenario())


def test_take_one_contribution_per_sender_newest_round_wins():
    async def scenario():
        inbox = Inbox()
        inbox.open(5)
        await inbox.put(update("a", 4, 1.0))  # a straggler's round-4 update ...
        await inbox.put(update("a", 5, 2.0))  # ... and its round-5 update: round 5 wins
        await inbox.put(update("b", 4, 3.0))  # late only: merged into round 5
        await inbox.put(update("c", 5, 4.0))
        await inbox.put(update("c", 5, 5.0))  # a resend replaces the earlier one
        await inbox.put(update("d", 6, 6.0))  # for a later round: stays
        taken = inbox.take(5)
        by_sender = {u.sender: u for u in taken}
        assert len(taken) == len(by_sender) == 3
        assert {s: (u.round, u.tensors["w"][0].item()) for s, u in by_sender.items()} == \
            {"a": (5, 2.0), "b": (4, 3.0), "c": (5, 5.0)}
        assert inbox.senders(4) == set() and inbox.senders(5) == set()
        assert inbox.senders(6) == {"d"}
        assert inbox.take(5) == []  # taken once
        inbox.open(6)
        assert [u.sender for u in inbox.take(6)] == ["d"]
    asyncio.run(scenario())


def test_take_drops_rounds_older_than_the_window():
    async def scenario():
        inbox = Inbox()
        inbox.open(3)
        await inbox.put(update("x", 2))  # late by one at round 3
        await inbox.put(update("y", 3))
        inbox.open(4)  # round 3 was never taken (e.g. the node skipped ahead)
        await inbox.put(update("z", 4))
        taken = inbox.take(5)  # window is rounds 4..5: round 2 and 3 are too old
        assert [u.sender for u in taken] == ["z"]
        assert inbox.senders(2) == set() and inbox.senders(3) == set()
    asyncio.run(scenario())


def test_wait_for_returns_as_soon_as_the_expected_senders_arrived():
    async def scenario():
        inbox = Inbox()
        inbox.open(2)
        await inbox.put(update("a", 2))
        put_done = asyncio.Event()

        async def deliver():
            await asyncio.sleep(0)  # let the waiter start waiting first
            await inbox.put(update("b", 2))
            put_done.set()

        started = time.monotonic()
        waiter = asyncio.create_task(inbox.wait_for(2, {"a", "b"}, timeout=120.0))
        await asyncio.sleep(0)
        assert not waiter.done()  # still missing "b"
        asyncio.create_task(deliver())
        got = await asyncio.wait_for(waiter, 60.0)
        elapsed = time.monotonic() - started
        assert put_done.is_set()
        assert got == {"a", "b"}
        assert elapsed < 60.0  # far below the 120 s timeout: it woke on the put
    asyncio.run(scenario())


def test_wait_for_returns_immediately_when_everyone_is_already_there():
    async def scenario():
        inbox = Inbox()
        await inbox.put(update("a", 1))
        started = time.monotonic()
        assert await inbox.wait_for(1, {"a"}, timeout=120.0) == {"a"}
        assert await inbox.wait_for(1, set(), timeout=120.0) == {"a"}
        assert time.monotonic() - started < 60.0  # far below the timeout: it never waited
    asyncio.run(scenario())


def test_wait_for_gives_up_at_the_timeout_when_someone_is_missing():
    async def scenario():
        inbox = Inbox()
        inbox.open(2)
        await inbox.put(update("a", 2))
        await inbox.put(update("c", 3))  # another round's update does not count
        started = time.monotonic()
        got = await inbox.wait_for(2, {"a", "b", "c"}, timeout=0.2)
        elapsed = time.monotonic() - started
        assert got == {"a"}
        assert 0.19 <= elapsed < 2.0
        # the inbox is still usable after a timed-out wait (the condition's lock was released)
        await asyncio.wait_for(inbox.put(update("b", 2)), 1.0)
        assert await inbox.wait_for(2, {"a", "b"}, timeout=5.0) == {"a", "b"}
    asyncio.run(scenario())


def test_unrelated_puts_do_not_end_the_wait_early():
    async def scenario():
        inbox = Inbox()
        inbox.open(2)
        waiter = asyncio.create_task(inbox.wait_for(2, {"a"}, timeout=0.3))
        await asyncio.sleep(0)
        started = time.monotonic()
        await inbox.put(update("b", 2))  # not the one we wait for
        await inbox.put(update("a", 3))  # right sender, wrong round
        got = await waiter
        assert got == {"b"}
        assert time.monotonic() - started >= 0.25
    asyncio.run(scenario())
