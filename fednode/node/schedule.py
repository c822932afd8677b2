"""Who pushes to whom in a round: a pure function of (round, sender, live set).

An exponential graph: sort the live ids (self included), and in round r peer i pushes to
i + 2^((r + j) mod ceil(log2 n)) for j < fanout. Every node computes the same graph from the
same view, so a receiver knows whom to wait for; with a churning view it simply waits until the
round deadline. Over log2(n) rounds every node's update reaches every other node (the graph is
a known fast-mixing topology for decentralised SGD).
"""

from __future__ import annotations

import math


def push_targets(round_: int, sender: str, members: list[str], fanout: int) -> list[str]:
    ids = sorted(set(members) | {sender})
    n = len(ids)
    if n < 2 or fanout < 1:
        return []
    hops = max(1, math.ceil(math.log2(n)))
    i = ids.index(sender)
    out: list[str] = []
    for j in range(min(fanout, n - 1) + hops):  # skip repeats, keep at most `fanout` distinct
        offset = 2 ** ((round_ + j) % hops)
        target = ids[(i + offset) % n]
        if target != sender and target not in out:
            out.append(target)
        if len(out) == min(fanout, n - 1):
            break
    if len(out) < min(fanout, n - 1):  # small meshes: fill with the next neighbours
        for k in range(1, n):
            target = ids[(i + k) % n]
            if target not in out:
                out.append(target)
            if len(out) == min(fanout, n - 1):
                break
    return out


def expected_senders(round_: int, receiver: str, members: list[str], fanout: int) -> set[str]:
    """The peers whose push_targets include `receiver` under the same view."""
    ids = sorted(set(members) | {receiver})
    return {s for s in ids if s != receiver and receiver in push_targets(round_, s, ids, fanout)}
