"""The draft tree's pure parts: its shape, the mask that lets a node see only its own path, and the walk."""

from __future__ import annotations

import pytest
import torch

from tools.throughput.draft_tree import CHAIN, Tree, TreeShape, accept, lookup_continuation, tree_inputs


def test_the_chain_comes_first_and_duplicate_siblings_are_dropped():
    tree = Tree.of([10, 11, 12], [[20, 10, 20], [], [30]])
    assert tree.tokens == (10, 11, 12, 20, 30)
    assert tree.parent == (-1, 0, 1, -1, 1)  # 20 is a second guess for depth 0, 30 one for depth 2
    assert tree.depth == (0, 1, 2, 0, 2)
    assert len(Tree.of([])) == 0
    with pytest.raises(ValueError, match="siblings"):
        Tree.of([1], [[2], [3]])


def test_each_node_sees_the_cache_the_committed_tokens_and_its_own_path():
    tree = Tree.of([10, 11], [[20], [21]])  # nodes: 10 (d0), 11 (d1, under 10), 20 (d0), 21 (d1, under 10)
    mask, pos = tree_inputs(tree, past=3, pending=2, dtype=torch.float32, device=torch.device("cpu"))
    seen = (mask[0, 0] == 0).int().tolist()
    assert mask.shape == (1, 1, 6, 9)
    assert seen == [
        [1, 1, 1, 1, 0, 0, 0, 0, 0],  # committed token 1: the cache and itself
        [1, 1, 1, 1, 1, 0, 0, 0, 0],  # committed token 2 (the root)
        [1, 1, 1, 1, 1, 1, 0, 0, 0],  # 10
        [1, 1, 1, 1, 1, 1, 1, 0, 0],  # 11 under 10
        [1, 1, 1, 1, 1, 0, 0, 1, 0],  # 20: a sibling of 10, not under it
        [1, 1, 1, 1, 1, 1, 0, 0, 1],  # 21: under 10, beside 11
    ]
    assert pos.tolist() == [[3, 4, 5, 6, 5, 6]]
    assert (mask[0, 0][mask[0, 0] != 0] == torch.finfo(torch.float32).min).all()
    with pytest.raises(ValueError, match="root"):
        tree_inputs(tree, 3, 0, torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("root_best, node_best, path, kept", [
    (10, [11, 40, 41, 42], [10, 11, 40], [0, 1]),  # the whole chain, then P's own token
    (20, [11, 40, 50, 42], [20, 50], [2]),  # the chain missed at depth 0, its sibling was P's token
    (10, [21, 40, 50, 60], [10, 21, 60], [0, 3]),  # missed at depth 1, the sibling there carried on
    (99, [11, 40, 50, 60], [99], []),  # nothing matched: P's own token only
])
def test_the_walk_keeps_the_path_p_agrees_with(root_best, node_best, path, kept):
    tree = Tree.of([10, 11], [[20], [21]])
    assert accept(tree, root_best, node_best) == (path, kept)


def test_the_walk_needs_ps_token_after_every_node():
    with pytest.raises(ValueError, match="nodes"):
        accept(Tree.of([1, 2]), 1, [2])


def test_a_path_reuses_the_nodes_it_shares_with_the_tree():
    tree = Tree.of([10, 11], [[20]])  # 10 -> 11, and 20 beside 10
    grown = tree.with_path([10, 12, 13])  # shares 10, then leaves the chain
    assert grown.tokens == (10, 11, 20, 12, 13) and grown.parent == (-1, 0, -1, 0, 3)
    assert grown.depth == (0, 1, 0, 1, 2)
    assert tree.with_path([10, 11]) == tree and tree.with_path([]) == tree
    assert Tree.of([]).with_path([5, 6]).parent == (-1, 0)
    assert accept(grown, 10, [12, 40, 41, 13, 50]) == ([10, 12, 13, 50], [0, 3, 4])


def test_prompt_lookup_continues_the_latest_earlier_occurrence_longest_ngram_first():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup_continuation(seq, 2) == [7, 8]  # "2 3" last seen before the end at index 5: 7, 8 followed
    assert lookup_continuation([4, 5, 6, 1, 5, 6], 3) == [1, 5, 6]  # the 2-gram "5 6" (no earlier "1 5 6")
    assert lookup_continuation([1, 2, 3, 4], 3) == []  # nothing recurs
    assert lookup_continuation(seq, 0) == [] and lookup_continuation([7], 2) == []
    assert lookup_continuation([5, 6, 5, 6], 4) == [5, 6]  # the continuation may run into the tail


def test_a_capped_tree_keeps_shallow_nodes_first_then_chain_lookup_runners_up():
    tree = Tree.of([10, 11, 12], [[20, 21], [22]]).with_path([30, 31])
    assert tree.rank == (0, 0, 0, 2, 3, 2, 1, 1)  # chain, runners-up 2 and 3, lookup 1
    capped = tree.pruned(4)  # depth 0: 10, 30 (lookup), 20, 21 (runners-up by rank)
    assert capped.tokens == (10, 20, 21, 30) and capped.parent == (-1, -1, -1, -1)
    five = tree.pruned(5)  # then the chain's depth-1 node, its parent kept
    assert five.tokens == (10, 11, 20, 21, 30) and five.parent == (-1, 0, -1, -1, -1)
    assert tree.pruned(0) == tree and tree.pruned(99) == tree


def test_a_tree_shape_counts_its_nodes_and_the_lengths_worth_timing():
    shape = TreeShape(2, lookup=True)
    assert shape.nodes_per_depth == 3 and shape.nodes(2) == 6 and shape.max_length(13) == 4
    capped = TreeShape(2, lookup=True, max_nodes=4)
    assert capped.nodes(1) == 3 and capped.nodes(3) == 4 and capped.max_length(13) == 2  # the chain reaches depth 2
    assert CHAIN.is_chain and not shape.is_chain and CHAIN.max_length(13) == 12
    with pytest.raises(ValueError, match="cap"):
        TreeShape(1, max_nodes=-1)
    deep = TreeShape(2, lookup=True, lookup_depth=4)  # the lookup branch goes on past the draft's one token
    assert deep.nodes(1) == 3 + 3 and deep.nodes(4) == 12 and deep.nodes(0) == 0
    with pytest.raises(ValueError, match="lookup depth"):
        TreeShape(1, lookup_depth=3)


def test_the_longest_length_worth_timing_fits_the_deep_lookup_branch():
    assert TreeShape(2, lookup=True, lookup_depth=12).max_length(13) == 0  # 1 + 11 more lookup nodes > 12
    assert TreeShape(1, lookup=True, lookup_depth=4).max_length(13) == 6  # 6 x 2 = 12 nodes
