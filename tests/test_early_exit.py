"""The self-speculative draft (fednode.learning.early_exit) on a real built-from-config Llama."""

from __future__ import annotations

import pytest
import torch
from helpers_models import FOUR, four_layer_model
from transformers import GenerationConfig

from fednode.learning.early_exit import early_exit_draft, exit_parameters, train_exit


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    return four_layer_model(tmp_path_factory.mktemp("tok"))


def test_the_draft_is_the_private_models_own_prefix_and_head(private):
    draft = early_exit_draft(private, 2)
    assert draft.model.layers[0] is private.model.layers[0] and len(draft.model.layers) == 2
    assert draft.model.embed_tokens is private.model.embed_tokens and draft.lm_head is private.lm_head
    own = exit_parameters(draft, private)
    assert sum(p.numel() for p in own) == FOUR.hidden_size  # only the exit norm is its own
    full = early_exit_draft(private, 4)  # every layer: exactly P
    ids = torch.randint(0, FOUR.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.equal(full(input_ids=ids).logits, private(input_ids=ids).logits)
    layer = early_exit_draft(private, 2, exit="layer")
    assert len(layer.model.layers) == 3 and layer.model.layers[2] is not private.model.layers[2]
    with pytest.raises(ValueError, match="outside 0..3"):
        early_exit_draft(private, 4, exit="layer")
    with pytest.raises(ValueError, match="exit"):
        early_exit_draft(private, 1, exit="bogus")


def test_training_the_exit_moves_it_toward_p_and_leaves_p_unchanged(private):
    draft = early_exit_draft(private, 1, exit="layer")
    before = {k: v.clone() for k, v in private.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, FOUR.vocab_size, (4, 24), generator=g) for _ in range(40)]
    heldout = [torch.randint(0, FOUR.vocab_size, (4, 24), generator=g) for _ in range(2)]
    out = train_exit(draft, private, batches, heldout, lr=3e-3)
    assert out.steps == 40 and out.kl_after < out.kl_before
    assert all(torch.equal(before[k], v) for k, v in private.state_dict().items())
    assert all(p.requires_grad for p in private.parameters())


def test_assisted_generation_with_the_early_exit_draft_is_ps_greedy_output(private):
    draft = early_exit_draft(private, 2, exit="layer")
    _assert_drafting_keeps_greedy_output(private, draft, seed=1)


def test_a_subset_head_scores_only_its_tokens_and_keeps_ps_greedy_output(private):
    from fednode.learning.early_exit import SubsetHead, coverage, frequent_tokens, with_subset_head

    blocks = [torch.tensor([[7, 7, 7, 9, 9, 3]]), torch.tensor([[9, 5]])]
    keep = frequent_tokens(blocks, 2, always=(0,))
    assert keep.tolist() == [0, 7, 9]  # 9 and 7 are the two most frequent, 0 (EOS) always
    assert coverage(keep, [[7, 9, 3], [0]]) == 0.75
    head = SubsetHead(private.lm_head.weight, keep)
    hidden = torch.randn(2, 3, FOUR.hidden_size)
    full = private.lm_head(hidden)
    out = head(hidden)
    assert out.shape == full.shape and torch.allclose(out[..., keep], full[..., keep], atol=1e-5)
    others = torch.ones(FOUR.vocab_size, dtype=torch.bool)
    others[keep] = False
    assert bool((out[..., others] == torch.finfo(out.dtype).min).all())
    with pytest.raises(ValueError, match="token ids"):
        SubsetHead(private.lm_head.weight, torch.tensor([FOUR.vocab_size]))
    common = torch.arange(5, FOUR.vocab_size, 3)  # a third of the vocabulary: drafts miss the rest
    draft = with_subset_head(early_exit_draft(private, 2, exit="layer"), common)
    _assert_drafting_keeps_greedy_output(private, draft, seed=2)


def _assert_drafting_keeps_greedy_output(private, draft, seed: int) -> None:
    """P drafted by `draft` (4 tokens a step, applied to the draft's own config, where transformers
    reads it) generates exactly P's greedy tokens."""
    from tools.throughput.generation import drafting_as, fixed_draft_length

    ids = torch.randint(5, FOUR.vocab_size, (1, 12), generator=torch.Generator().manual_seed(seed))
    cfg = fixed_draft_length(GenerationConfig(do_sample=False, max_new_tokens=24, min_new_tokens=24,
                                              eos_token_id=private.config.eos_token_id,
                                              pad_token_id=private.config.eos_token_id), 4)
    with torch.no_grad(), drafting_as(draft, cfg):
        plain = private.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        assisted = private.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                    assistant_model=draft)
    assert torch.equal(plain, assisted)
