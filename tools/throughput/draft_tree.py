"""A draft tree: the draft's chain plus its runner-up tokens at each depth, verified in one forward.

A chain of drafts is lost at its first miss. When the draft's best guess at depth d is wrong, its
second or third guess is often P's token (SpecInfer, Miao et al. 2024; EAGLE-2, Li et al. 2024):
putting those runners-up into the same verification forward as siblings of the chain token costs a
few more positions of that forward (on a CPU, with the decode layout, 1..5 positions cost about
the same) and turns a miss into one more committed token (the sibling, and P's token after it).

Pure parts here: the tree's shape, the attention mask and positions that let every node see the
cache, its ancestors and itself, and the walk that keeps the longest path P agrees with. The loop
that drafts and verifies is `tools.throughput.speculative.feature_tree_greedy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeShape:
    """What a step verifies: `width` guesses of the draft per depth, a prompt-lookup branch or not, and
    at most `max_nodes` nodes (0: no cap; kept by depth, then chain, lookup, runners-up)."""

    width: int = 1
    lookup: bool = False
    max_nodes: int = 0
    lookup_depth: int = 0  # the lookup branch reaches this deep even when the draft drafts less (0: as deep)

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"a draft tree needs width >= 1, got {self.width}")
        if self.max_nodes < 0:
            raise ValueError(f"a draft tree's node cap must be >= 0 (0: none), got {self.max_nodes}")
        if self.lookup_depth < 0 or (self.lookup_depth and not self.lookup):
            raise ValueError(f"a lookup depth ({self.lookup_depth}) needs the lookup branch and must be >= 0")

    @property
    def nodes_per_depth(self) -> int:
        """At most this many nodes per draft depth (a step at length k verifies up to k x this + 1)."""
        return self.width + int(self.lookup)

    def nodes(self, length: int) -> int:
        """At most how many nodes a step drafting `length` verifies."""
        full = length * self.nodes_per_depth + (max(self.lookup_depth - length, 0) if length else 0)
        return min(full, self.max_nodes) if self.max_nodes else full

    def max_length(self, measured: int) -> int:
        """The longest useful draft length when forwards over up to `measured` tokens were timed: its
        nodes must fit, and under a cap the chain reaches no deeper than the cap lets it."""
        reach = -(-self.max_nodes // self.nodes_per_depth) if self.max_nodes else measured
        longest = 0
        for length in range(1, min(reach, measured) + 1):
            if self.nodes(length) <= measured - 1:
                longest = length
        return longest

    @property
    def is_chain(self) -> bool:
        return self.nodes_per_depth == 1


CHAIN = TreeShape()
# --draft features' default: 2026-12-07, smollm2-135m on 2 EPYC cores, paired over plain greedy: the
# chain 1.04x, width 2 + lookup 1.38x, this 1.47x (bench/RESULTS.md), identical output throughout
FEATURE_TREE = TreeShape(width=2, lookup=True, lookup_depth=3)


@dataclass(frozen=True)
class Tree:
    """Nodes in verification order: the chain c_0..c_{k-1} first (so accepting a chain prefix keeps a
    cache prefix), then the siblings. parent[i] = -1 for a child of the root (the newest committed token)."""

    tokens: tuple[int, ...]
    parent: tuple[int, ...]
    depth: tuple[int, ...]
    rank: tuple[int, ...] = ()  # within a depth, what a cap keeps first: 0 chain, 1 lookup, 2 + j runner-up j

    def __post_init__(self) -> None:
        if not self.rank:
            object.__setattr__(self, "rank", (0,) * len(self.tokens))

    @classmethod
    def of(cls, chain: Sequence[int], siblings: Sequence[Sequence[int]] = ()) -> Tree:
        """`siblings[d]`: the draft's runners-up at depth d (children of chain[d - 1], or of the root)."""
        if len(siblings) > len(chain):
            raise ValueError(f"siblings for {len(siblings)} depths, but the chain has {len(chain)}")
        tokens, parent, depth = list(chain), [i - 1 for i in range(len(chain))], list(range(len(chain)))
        rank = [0] * len(chain)
        for d, alts in enumerate(siblings):
            seen = {int(chain[d])}
            for token in map(int, alts):
                if token in seen:
                    continue  # a duplicate would be verified twice for nothing
                rank.append(1 + len(seen))  # the first runner-up 2, the next 3, ...
                seen.add(token)
                tokens.append(token)
                parent.append(d - 1)
                depth.append(d)
        return cls(tuple(int(t) for t in tokens), tuple(parent), tuple(depth), tuple(rank))

    def __len__(self) -> int:
        return len(self.tokens)

    def with_path(self, path: Sequence[int]) -> Tree:
        """The tree with `path` (tokens from the root) added as a branch: nodes it shares with the tree
        are reused, the rest appended after them (so the chain stays first)."""
        tokens, parent, depth, rank = list(self.tokens), list(self.parent), list(self.depth), list(self.rank)
        node = -1
        for d, token in enumerate(map(int, path)):
            child = next((i for i, p in enumerate(parent) if p == node and tokens[i] == token), None)
            if child is None:
                tokens.append(token)
                parent.append(node)
                depth.append(d)
                rank.append(1)
                child = len(tokens) - 1
            node = child
        return Tree(tuple(tokens), tuple(parent), tuple(depth), tuple(rank))

    def pruned(self, max_nodes: int) -> Tree:
        """At most `max_nodes` nodes (0: all): shallower first, then by rank. A node's parent is one depth
        shallower, so it is always kept before the node; the kept ones stay in their order."""
        if not max_nodes or len(self) <= max_nodes:
            return self
        keep = sorted(sorted(range(len(self)), key=lambda i: (self.depth[i], self.rank[i], i))[:max_nodes])
        new = {old: j for j, old in enumerate(keep)}
        return Tree(tuple(self.tokens[i] for i in keep), tuple(new.get(self.parent[i], -1) for i in keep),
                    tuple(self.depth[i] for i in keep), tuple(self.rank[i] for i in keep))


LOOKUP_NGRAMS = (3, 2)  # the longest suffix of the committed tokens looked up first


def lookup_continuation(seq: Sequence[int], length: int, ngrams: Sequence[int] = LOOKUP_NGRAMS) -> list[int]:
    """Prompt lookup (Saxena 2023): the `length` tokens that followed the latest earlier occurrence of
    the committed text's last n tokens (n from `ngrams`, longest first); [] when none recurs.

    Code repeats itself (names from the signature, a loop's shape), and a greedy small model more so;
    the guess costs no model forward, so it rides in the tree as one more branch."""
    if length < 1:
        return []
    for n in ngrams:
        if n < 1 or len(seq) <= n:
            continue
        tail = list(seq[-n:])
        for start in range(len(seq) - n - 1, -1, -1):
            if list(seq[start:start + n]) == tail:
                return [int(t) for t in seq[start + n:start + n + length]]
    return []


def tree_inputs(tree: Tree, past: int, pending: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive mask (1, 1, q, past + q), positions (1, q)) for a forward over `pending` committed
    tokens (causal; the last is the root) followed by the tree's nodes, after `past` cached ones."""
    if pending < 1:
        raise ValueError("a tree forward reads at least the newest committed token (its root)")
    q = pending + len(tree)
    allowed = torch.zeros(q, past + q, dtype=torch.bool)
    allowed[:, :past] = True
    allowed[:pending, past:past + pending] = torch.ones(pending, pending, dtype=torch.bool).tril()
    allowed[pending:, past:past + pending] = True  # every node sees all committed tokens
    for i in range(len(tree)):
        node = i
        while node >= 0:  # itself and its ancestors
            allowed[pending + i, past + pending + node] = True
            node = tree.parent[node]
    mask = torch.zeros(q, past + q, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    positions = [past + j for j in range(pending)] + [past + pending + d for d in tree.depth]
    return mask[None, None].to(device), torch.tensor([positions], device=device)


def accept(tree: Tree, root_best: int, node_best: Sequence[int]) -> tuple[list[int], list[int]]:
    """(tokens to commit, kept node indices): follow P's argmax from the root down the tree while a
    child carries it (the chain child first); P's own token ends the path. node_best[i] is P's argmax
    after node i."""
    if len(node_best) != len(tree):
        raise ValueError(f"P's argmax for {len(node_best)} nodes, the tree has {len(tree)}")
    children: dict[int, list[int]] = {}
    for i, p in enumerate(tree.parent):
        children.setdefault(p, []).append(i)
    node, best, out, kept = -1, int(root_best), [], []
    while True:
        hit = next((c for c in children.get(node, ()) if tree.tokens[c] == best), None)
        out.append(best)
        if hit is None:
            return out, kept
        kept.append(hit)
        node, best = hit, int(node_best[hit])
