"""Bounds on every integer and weight a peer can put on the wire.

A protobuf uint64 can carry 2**64-1; SQLite, the journal and the round loop cannot (an epoch of
2**63 once stopped every daemon from inside `journal.record_epoch`). Each value a peer sends is
checked here before anything else looks at it, and an out-of-range one is refused as MALFORMED
(typed, counted by the caller). The limits are far above anything an honest mesh reaches: a round
takes seconds, so 2**40 rounds is tens of thousands of years.
"""

from __future__ import annotations

import math

from fednode.errors import ProtocolError, Reason

MAX_ROUND = 2**40  # rounds, activation rounds, committed rounds
MAX_EPOCH = 2**40  # negotiation epochs (one per capacity change)
MAX_HEARTBEAT = 2**48  # one per gossip tick (plus one per commit)
MAX_INCARNATION = 2**48  # one per start of a node
MAX_SEQ = 2**48  # one per published negotiation record
MAX_LEVEL = 255  # messenger ladder levels (a ladder has a handful)
MAX_STREAK = 2**20  # consecutive rounds over budget
MAX_TOKENS = 2**56  # tokens trained on, ever
MAX_WEIGHT = 2.0**53  # aggregation weight in a header (tokens of one round; clipped far lower on merge)
MAX_SEED = 2**63 - 1  # growth seeds fit int64 (negotiation.growth_seed shifts right by one)
MAX_CHUNKS = 2**40  # chunk indexes


def check_int(what: str, value: int, high: int, *, who: str = "peer") -> int:
    """`value` if 0 <= value <= high, else ProtocolError(MALFORMED)."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
        raise ProtocolError(Reason.MALFORMED, f"{what} {str(value)[:40]} from {who} is outside [0, {high}]")
    return value


def check_weight(value: float, *, who: str = "peer") -> float:
    """A header weight: finite, > 0 and at most MAX_WEIGHT, else ProtocolError(MALFORMED)."""
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if not (math.isfinite(weight) and 0 < weight <= MAX_WEIGHT):
        raise ProtocolError(Reason.MALFORMED, f"aggregation weight {str(value)[:40]} from {who} is not in "
                                              f"(0, {MAX_WEIGHT:.0f}]")
    return weight
