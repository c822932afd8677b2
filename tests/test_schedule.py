"""Round push schedule: an exponential graph that every node derives from the same view."""

from __future__ import annotations

import math
import random

import pytest

from fednode.node.schedule import expected_senders, push_targets

SIZES = range(1, 21)
ROUNDS = range(0, 9)
FANOUTS = (1, 2, 3, 5)


def ids_of(n: int) -> list[str]:
    return [f"site-{i:02d}" for i in range(n)]


@pytest.mark.parametrize("fanout", FANOUTS)
def test_push_targets_shape(fanout):
    for n in SIZES:
        ids = ids_of(n)
        for r in ROUNDS:
            for sender in ids:
                out = push_targets(r, sender, ids, fanout)
                assert sender not in out, (n, r, sender)
                assert len(out) == len(set(out)), (n, r, sender, out)
                assert len(out) == min(fanout, n - 1), (n, r, sender, out)
                assert set(out) <= set(ids)


def test_push_targets_is_deterministic_and_independent_of_member_order_and_duplicates():
    rng = random.Random(7)
    for n in SIZES:
        ids = ids_of(n)
        for r in ROUNDS:
            for sender in ids:
                want = push_targets(r, sender, ids, 2)
                shuffled = ids[:] + ids[: n // 2]  # repeats too
                rng.shuffle(shuffled)
                assert push_targets(r, sender, shuffled, 2) == want
                # the sender is part of the graph whether or not the view lists it
                assert push_targets(r, sender, [i for i in ids if i != sender], 2) == want


def test_small_meshes():
    assert push_targets(0, "a", [], 2) == []
    assert push_targets(3, "a", ["a"], 2) == []
    assert push_targets(0, "a", ["b"], 2) == ["b"]
    assert push_targets(0, "b", ["a", "b"], 3) == ["a"]
    assert expected_senders(0, "a", ["a"], 1) == set()


def test_fanout_one_follows_the_exponential_offsets():
    ids = ids_of(8)  # hops = 3: offsets 1, 2, 4 in rounds 0, 1, 2, then again
    for r in range(6):
        offset = 2 ** (r % 3)
        for i, sender in enumerate(ids):
            assert push_targets(r, sender, ids, 1) == [ids[(i + offset) % 8]]


def test_rounds_rotate_the_targets():
    ids = ids_of(16)
    seen = {tuple(push_targets(r, ids[0], ids, 1)) for r in range(4)}
    assert len(seen) == 4  # log2(16) different partners over log2(16) rounds


def push_graph(r: int, ids: list[str], fanout: int) -> dict[str, list[str]]:
    return {s: push_targets(r, s, ids, fanout) for s in ids}


@pytest.mark.parametrize("fanout", FANOUTS)
def test_expected_senders_matches_push_targets(fanout):
    for n in SIZES:
        ids = ids_of(n)
        for r in ROUNDS:
            graph = push_graph(r, ids, fanout)
            for receiver in ids:
                want = {s for s, targets in graph.items() if receiver in targets}
                assert expected_senders(r, receiver, ids, fanout) == want, (n, r, receiver)


@pytest.mark.parametrize("fanout", FANOUTS)
def test_in_degree_equals_out_degree(fanout):
    irregular = []
    for n in SIZES:
        ids = ids_of(n)
        for r in ROUNDS:
            graph = push_graph(r, ids, fanout)
            in_degree = dict.fromkeys(ids, 0)
            for targets in graph.values():
                for t in targets:
                    in_degree[t] += 1
            irregular += [(n, r, node, in_degree[node], len(graph[node])) for node in ids
                          if in_degree[node] != len(graph[node])]
    assert irregular == []


def _flood(ids: list[str], source: str, rounds: range, fanout: int) -> set[str]:
    """Round by round: every informed node pushes to its targets of that round."""
    informed = {source}
    for r in rounds:
        informed |= {t for s in informed for t in push_targets(r, s, ids, fanout)}
    return informed


@pytest.mark.parametrize("start_round", [0, 1, 2, 5, 17])
def test_information_reaches_everyone_in_ceil_log2_n_rounds_with_fanout_one(start_round):
    for n in range(2, 21):
        ids = ids_of(n)
        hops = math.ceil(math.log2(n))
        window = range(start_round, start_round + hops)
        union = {(s, t) for r in window for s in ids for t in push_targets(r, s, ids, 1)}
        for source in ids:
            # time-respecting: a node forwards only what it already had at the start of a round
            assert _flood(ids, source, window, 1) == set(ids), (n, start_round, source)
            # and hence the union of the rounds' edges connects the source to everyone
            reached, frontier = {source}, [source]
            while frontier:
                node = frontier.pop()
                for s, t in union:
                    if s == node and t not in reached:
                        reached.add(t)
                        frontier.append(t)
            assert reached == set(ids)


def test_fewer_rounds_than_log2_n_do_not_suffice_for_fanout_one():
    # the bound is tight: with one push per round the informed set at most doubles
    ids = ids_of(16)
    assert len(_flood(ids, ids[0], range(0, 3), 1)) == 8


def test_fanout_zero_pushes_to_nobody():
    assert push_targets(0, "site-00", ids_of(8), 0) == []
