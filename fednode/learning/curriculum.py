"""Curriculum over training blocks: difficulty scores, K quantile buckets, sigmoid gates by round.

Papers.md 4.7: bucket k is gated by g_k(t) = sigmoid(steepness * (t - tau_k)) and sampled with
probability p_k(t) ∝ g_k(t) * n_k. Unlike AFFL's softmax over levels (A1 step 3, which always
favours the easiest level) buckets unlock in turn, and the easy bucket is never dropped.
With every gate at 1 the sampler is plain uniform sampling over blocks (curriculum off).
"""

from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import torch

from fednode.learning.trainer import causal_lm_loss

DEFAULT_BUCKETS = 4
DEFAULT_STEEPNESS = 1.0  # 1/s: the gate goes from 0.12 to 0.88 within +-2 rounds of its midpoint
DEFAULT_MIDPOINT_ROUNDS = 2.0  # bucket k is half open at round k * 2
GATE_FLOOR = 1e-3  # gates below are 0 (locked), above 1 - floor are 1 (fully open)

Kind = Literal["length", "loss", "ast"]


def length_scores(blocks: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
    """Non-pad tokens per block (constant for the unpadded blocks of TokenDataset)."""
    if pad_id is None:
        return torch.full((blocks.shape[0],), float(blocks.shape[1]))
    return (blocks != pad_id).sum(dim=1).float()


def loss_scores(model, blocks: torch.Tensor, *, batch_size: int = 32, pad_id: int | None = None) -> torch.Tensor:
    """Current mean token loss of each block (self-paced difficulty); one forward pass per block."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for chunk in torch.split(blocks.long(), batch_size):
                logits = model(input_ids=chunk, use_cache=False).logits
                per_tok = causal_lm_loss(logits, chunk, reduction="none").view(chunk.shape[0], -1)
                if pad_id is None:
                    out.append(per_tok.mean(dim=1))
                else:
                    mask = ((chunk[:, :-1] != pad_id) & (chunk[:, 1:] != pad_id)).float()
                    out.append((per_tok * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0))
    finally:
        model.train(was_training)
    return torch.cat(out)


_BLOCK_NODES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.If,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.With,
    ast.AsyncWith,
    ast.Try,
    ast.Match,
    ast.ExceptHandler,
    ast.match_case,
)
if hasattr(ast, "TryStar"):
    _BLOCK_NODES = (*_BLOCK_NODES, ast.TryStar)  # type: ignore[assignment]


def _ast_nesting(tree: ast.AST) -> int:
    """Deepest nesting of indented blocks (def, class, if, for, ...): 0 for flat code."""
    best = 0
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, _BLOCK_NODES):
            depth += 1
            best = max(best, depth)
        stack.extend((child, depth) for child in ast.iter_child_nodes(node))
    return best


def _indent_nesting(text: str) -> int:
    """Indentation levels of the deepest line: the same scale as _ast_nesting, for fragments."""
    lines = text.split("\n")[1:] or [text]  # a block's first line is usually cut mid-line
    widths = [len(line) - len(line.lstrip(" \t")) for line in lines if line.strip()]
    unit = min((w for w in widths if w > 0), default=0)
    return max(widths, default=0) // unit if unit else 0


def nesting_depth(source: str) -> int:
    """Block-nesting depth of code: exact from the AST when it parses, from indentation otherwise.

    Token blocks are mostly fragments that do not parse; the indentation count is on the same
    scale as the AST count, so parseable and unparseable blocks share one ranking.
    """
    try:
        with warnings.catch_warnings():  # fragments like `1if` warn "invalid decimal literal" on stderr
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source)
        return _ast_nesting(tree)
    except (SyntaxError, ValueError):
        return _indent_nesting(source)


def ast_scores(blocks: torch.Tensor, tokenizer) -> torch.Tensor:
    """Nesting depth of each decoded block (cheap: no model, a parse attempt per block)."""
    return torch.tensor([float(nesting_depth(tokenizer.decode(row.tolist()))) for row in blocks])


def difficulty_scores(
    blocks: torch.Tensor,
    kind: Kind,
    *,
    model=None,
    tokenizer=None,
    pad_id: int | None = None,
) -> torch.Tensor:
    """Per-block difficulty [n] (higher = harder): token length, current model loss, or code nesting.

    "loss" needs `model`, "ast" needs `tokenizer` (anything with decode(list[int]) -> str).
    """
    if blocks.ndim != 2 or blocks.shape[0] == 0:
        raise ValueError(f"blocks must be a non-empty [n, seq] tensor, got shape {tuple(blocks.shape)}")
    if kind == "length":
        return length_scores(blocks, pad_id)
    if kind == "loss":
        if model is None:
            raise ValueError('difficulty kind "loss" needs a model')
        return loss_scores(model, blocks, pad_id=pad_id)
    if kind == "ast":
        if tokenizer is None:
            raise ValueError('difficulty kind "ast" needs a tokenizer to decode the blocks')
        return ast_scores(blocks, tokenizer)
    raise ValueError(f'unknown difficulty kind {kind!r}: use "length", "loss" or "ast"')


def bucketize(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bucket ids 0..k-1 by score quantiles (0 = easiest); equal scores share a bucket.

    A score goes to the number of quantile edges strictly below it, so the easiest block is
    always in bucket 0; heavy ties can leave a harder bucket empty (the sampler skips it).
    """
    if k < 1:
        raise ValueError(f"k {k} must be >= 1")
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"scores must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    values = scores.double()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("scores hold NaN or Inf")
    edges = torch.quantile(values, torch.arange(1, k, dtype=torch.float64) / k)
    return torch.searchsorted(edges, values, right=False)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def unlocked_buckets(
    round_: float,
    k: int,
    *,
    steepness: float = DEFAULT_STEEPNESS,
    midpoint_rounds: float | Sequence[float] = DEFAULT_MIDPOINT_ROUNDS,
    floor: float = GATE_FLOOR,
) -> list[float]:
    """Gate in [0, 1] per bucket at this round: g_0 = 1, g_j = sigmoid(steepness * (round - tau_j)).

    midpoint_rounds is either a spacing (tau_j = j * spacing) or the k-1 midpoints tau_1..tau_{k-1}
    (non-decreasing). Gates below `floor` snap to 0 (locked), above 1 - floor to 1, so a bucket is
    really closed early and really fully open late. Non-increasing in bucket, non-decreasing in round.
    """
    if k < 1:
        raise ValueError(f"k {k} must be >= 1")
    if not steepness > 0:
        raise ValueError(f"steepness {steepness} must be > 0")
    if isinstance(midpoint_rounds, int | float):
        taus = [j * float(midpoint_rounds) for j in range(1, k)]
    else:
        taus = [float(t) for t in midpoint_rounds]
        if len(taus) != k - 1:
            raise ValueError(f"midpoint_rounds holds {len(taus)} values: need k-1 = {k - 1}")
    if any(b < a for a, b in zip(taus, taus[1:], strict=False)):
        raise ValueError("midpoint_rounds must be non-decreasing: harder buckets unlock later")
    gates = [1.0]
    for tau in taus:
        g = _sigmoid(steepness * (round_ - tau))
        gates.append(0.0 if g < floor else 1.0 if g > 1.0 - floor else g)
    return gates


class CurriculumSampler:
    """Seeded draws of training-block indices: bucket k with probability ∝ gate_k * n_k, uniform inside.

    Usable as MutualTrainer's batch_filter: `sampler(batch_size, generator)`.
    """

    def __init__(self, bucket_ids: torch.Tensor, gates: Sequence[float]):
        bucket_ids = bucket_ids.long()
        if bucket_ids.ndim != 1 or bucket_ids.numel() == 0:
            raise ValueError("bucket_ids must be a non-empty 1-D tensor")
        if int(bucket_ids.min()) < 0 or int(bucket_ids.max()) >= len(gates):
            raise ValueError(f"bucket ids must lie in 0..{len(gates) - 1} (one gate per bucket)")
        if any(not 0.0 <= g <= 1.0 for g in gates):
            raise ValueError(f"gates {list(gates)} must lie in [0, 1]")
        self.bucket_ids = bucket_ids
        self.gates = [float(g) for g in gates]
        self._block_weights = torch.tensor(self.gates, dtype=torch.float64)[bucket_ids]
        if float(self._block_weights.sum()) <= 0:
            raise ValueError("every non-empty bucket is locked: open at least one (bucket 0 should be)")

    @classmethod
    def for_round(
        cls,
        bucket_ids: torch.Tensor,
        round_: float,
        *,
        k: int = DEFAULT_BUCKETS,
        enabled: bool = True,
        steepness: float = DEFAULT_STEEPNESS,
        midpoint_rounds: float | Sequence[float] = DEFAULT_MIDPOINT_ROUNDS,
    ) -> CurriculumSampler:
        """The sampler for one round; enabled=False opens every bucket (uniform over blocks)."""
        if not enabled:
            return cls(bucket_ids, [1.0] * k)
        return cls(bucket_ids, unlocked_buckets(round_, k, steepness=steepness, midpoint_rounds=midpoint_rounds))

    def bucket_probabilities(self) -> list[float]:
        """Probability of drawing from each bucket: gate * size, normalised."""
        sizes = torch.bincount(self.bucket_ids, minlength=len(self.gates)).double()
        mass = sizes * torch.tensor(self.gates, dtype=torch.float64)
        return (mass / mass.sum()).tolist()

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """batch_size block indices drawn with replacement."""
        return torch.multinomial(self._block_weights, batch_size, replacement=True, generator=generator)

    def batches(self, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
        """`steps` index batches, reproducible from seed."""
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            yield self(batch_size, gen)
