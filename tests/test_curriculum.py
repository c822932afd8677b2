"""Curriculum: difficulty scores, quantile buckets, sigmoid gates and the seeded sampler."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fednode.learning.curriculum import (
    CurriculumSampler,
    bucketize,
    difficulty_scores,
    nesting_depth,
    unlocked_buckets,
)
from fednode.learning.data import TokenDataset
from fednode.learning.distill import MutualTrainer

PAD = 0


class CharTokenizer:
    """Decode-only stand-in: token id = code point."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i != PAD)


def _encode(text: str, seq: int) -> list[int]:
    ids = [ord(c) for c in text][:seq]
    return ids + [PAD] * (seq - len(ids))


def micro_model(seed: int, vocab: int = 32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


# --- difficulty and buckets --------------------------------------------------------------------


def test_length_scores_count_non_pad():
    blocks = torch.tensor([[5, 6, 0, 0], [5, 6, 7, 8], [5, 0, 0, 0]])
    assert difficulty_scores(blocks, "length", pad_id=PAD).tolist() == [2.0, 4.0, 1.0]
    assert difficulty_scores(blocks, "length").tolist() == [4.0, 4.0, 4.0]


def test_nesting_depth_ast_and_fragment_fallback():
    assert nesting_depth("x = 1\ny = 2\n") == 0
    assert nesting_depth("def f():\n    if x:\n        return 1\n") == 2
    # a fragment cut mid-line does not parse: indentation gives the same scale
    fragment = "rn x\n    for i in y:\n        if i:\n            z()\n"
    assert nesting_depth(fragment) == 3


def test_scoring_a_fragment_prints_no_syntax_warning():
    # `1if` and friends made ast.parse write "<unknown>:1: SyntaxWarning" lines into the
    # daemon's and the benchmark's output for every block scored
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert nesting_depth("x = 1if y else 2\n") == 0
    assert not [w for w in caught if issubclass(w.category, SyntaxWarning)]


def test_ast_scores_rank_nested_code_harder():
    texts = [
        "a = 1\nb = 2\n",
        "def f():\n    return 1\n",
        "def f():\n    for i in x:\n        if i:\n            g()\n",
    ]
    blocks = torch.tensor([_encode(t, 64) for t in texts])
    scores = difficulty_scores(blocks, "ast", tokenizer=CharTokenizer())
    assert scores.tolist() == [0.0, 1.0, 3.0]
    with pytest.raises(ValueError, match="tokenizer"):
        difficulty_scores(blocks, "ast")


def test_loss_scores_follow_the_model():
    model = micro_model(0)
    blocks = torch.randint(1, 32, (5, 8))
    scores = difficulty_scores(blocks, "loss", model=model)
    assert scores.shape == (5,) and bool(torch.isfinite(scores).all())
    with torch.no_grad():
        logits = model(input_ids=blocks[:1], use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(logits[0, :-1], blocks[0, 1:])
    assert float(scores[0]) == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="model"):
        difficulty_scores(blocks, "loss")
    with pytest.raises(ValueError, match="unknown"):
        difficulty_scores(blocks, "nope")  # type: ignore[arg-type]


def test_bucketize_quantiles():
    scores = torch.arange(12, dtype=torch.float32)
    ids = bucketize(scores, 4)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    shuffled = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bucketize(scores[shuffled], 4), ids[shuffled])
    ties = bucketize(torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0]), 3)
    assert ties.tolist()[:4] == [0, 0, 0, 0] and ties[4] > 0  # equal scores share a bucket; easiest in 0
    assert bucketize(torch.tensor([3.0]), 4).tolist() == [0]
    assert int(bucketize(torch.rand(50), 5).max()) <= 4
    with pytest.raises(ValueError):
        bucketize(torch.tensor([]), 3)
    with pytest.raises(ValueError):
        bucketize(scores, 0)


# --- gates -------------------------------------------------------------------------------------


def test_gates_easy_bucket_always_open_and_monotone():
    k = 4
    rows = [unlocked_buckets(r, k, steepness=1.0, midpoint_rounds=3.0) for r in range(0, 30)]
    for gates in rows:
        assert len(gates) == k and gates[0] == 1.0
        assert all(0.0 <= g <= 1.0 for g in gates)
        assert all(a >= b for a, b in zip(gates, gates[1:], strict=False))  # harder never more open
    for j in range(k):
        column = [gates[j] for gates in rows]
        assert all(a <= b for a, b in zip(column, column[1:], strict=False))  # never closes again
    assert rows[0][3] == 0.0 and 0.0 < rows[0][1] < 0.5  # hardest locked early, next one ramping
    assert rows[-1] == [1.0] * k  # all open late
    assert unlocked_buckets(3.0, 2, steepness=1.0, midpoint_rounds=3.0)[1] == pytest.approx(0.5)


def test_gates_explicit_midpoints_and_errors():
    gates = unlocked_buckets(5, 3, steepness=2.0, midpoint_rounds=[5.0, 20.0])
    assert gates == [1.0, pytest.approx(0.5), 0.0]
    assert unlocked_buckets(0, 1, steepness=1.0, midpoint_rounds=2.0) == [1.0]
    with pytest.raises(ValueError, match="k-1"):
        unlocked_buckets(5, 3, steepness=1.0, midpoint_rounds=[1.0])
    with pytest.raises(ValueError, match="non-decreasing"):
        unlocked_buckets(5, 3, steepness=1.0, midpoint_rounds=[4.0, 2.0])
    with pytest.raises(ValueError, match="steepness"):
        unlocked_buckets(5, 3, steepness=0.0, midpoint_rounds=1.0)


# --- sampler -----------------------------------------------------------------------------------


def test_sampler_never_draws_locked_buckets_and_is_deterministic():
    bucket_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3, 3])
    sampler = CurriculumSampler(bucket_ids, [1.0, 0.5, 0.0, 0.0])
    draws = torch.cat(list(sampler.batches(16, 50, seed=3)))
    assert set(bucket_ids[draws].tolist()) == {0, 1}
    assert sampler.bucket_probabilities() == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0])
    share_1 = float((bucket_ids[draws] == 1).float().mean())
    assert share_1 == pytest.approx(1 / 3, abs=0.06)
    again = torch.cat(list(sampler.batches(16, 50, seed=3)))
    other = torch.cat(list(sampler.batches(16, 50, seed=4)))
    assert torch.equal(draws, again) and not torch.equal(draws, other)


def test_sampler_late_rounds_and_disabled_are_uniform():
    bucket_ids = bucketize(torch.arange(40, dtype=torch.float32), 4)
    early = CurriculumSampler.for_round(bucket_ids, 0, k=4, midpoint_rounds=3.0)
    assert early.gates[0] == 1.0 and early.gates[-1] == 0.0
    late = CurriculumSampler.for_round(bucket_ids, 100, k=4, midpoint_rounds=3.0)
    off = CurriculumSampler.for_round(bucket_ids, 0, k=4, enabled=False)
    for sampler in (late, off):
        assert sampler.bucket_probabilities() == pytest.approx([0.25] * 4)
        drawn = torch.cat(list(sampler.batches(40, 100, seed=0)))
        counts = torch.bincount(drawn, minlength=40).float()
        assert int((counts > 0).sum()) == 40  # every block reachable
    with pytest.raises(ValueError, match="locked"):
        CurriculumSampler(torch.tensor([1, 1]), [1.0, 0.0])
    with pytest.raises(ValueError, match="gate"):
        CurriculumSampler(torch.tensor([0, 3]), [1.0, 1.0])


def test_sampler_hooks_into_mutual_trainer():
    blocks = torch.randint(1, 32, (20, 8), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    data = TokenDataset(blocks, blocks[:2])
    bucket_ids = torch.tensor([0] * 5 + [1] * 15)
    sampler = CurriculumSampler(bucket_ids, [1.0, 0.0])
    drawn = []

    def spy(batch_size, generator):
        idx = sampler(batch_size, generator)
        drawn.append(idx)
        return idx

    trainer = MutualTrainer(micro_model(1), micro_model(2))
    trainer.train(data, steps=3, batch_size=4, seed=0, batch_filter=spy)
    assert len(drawn) == 3 and all(int(i.max()) < 5 for i in drawn)
