"""Fitting the early exit on cached prefix states (fednode.learning.exit_fit) trains the draft that runs."""

from __future__ import annotations

import pytest
import torch
from helpers_models import FOUR, four_layer_model

from fednode.learning.early_exit import early_exit_draft, with_subset_head
from fednode.learning.exit_fit import IGNORE, ExitSet, _head_logits, _prefix, _tail, exit_agreement, fit_exit


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    return four_layer_model(tmp_path_factory.mktemp("tok"))


def _sequences(n: int, seed: int) -> torch.Tensor:
    return torch.randint(5, FOUR.vocab_size, (n, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("exit_kind", ["layer", "norm"])
def test_the_cached_tail_computes_the_drafts_own_logits(private, exit_kind):
    keep = torch.arange(3, FOUR.vocab_size, 2)
    draft = with_subset_head(early_exit_draft(private, 2, exit=exit_kind), keep)
    ids = _sequences(2, 0)
    with torch.no_grad():
        whole = draft(input_ids=ids, use_cache=False).logits[..., keep]
        states = _prefix(private, 2)(input_ids=ids, use_cache=False).last_hidden_state
        cached = _head_logits(draft, _tail(draft, private, 2)(inputs_embeds=states, use_cache=False).last_hidden_state)
    assert torch.allclose(whole, cached, atol=1e-5)


def test_targets_count_only_the_continuation_and_only_the_heads_tokens(private):
    keep = torch.arange(0, FOUR.vocab_size, 3)
    draft = with_subset_head(early_exit_draft(private, 1, exit="layer"), keep)
    seqs = _sequences(3, 1)
    data = ExitSet.build(private, draft, 1, seqs, start=10, loss="kl")
    assert data.start == 9 and bool((data.top1[:, :9] == IGNORE).all())
    with torch.no_grad():
        best = private(input_ids=seqs).logits.argmax(-1)[:, 9:]
    rows = data.top1[:, 9:]
    in_head = torch.isin(best, keep)
    assert torch.equal(rows != IGNORE, in_head)  # a token the head cannot propose is no target
    assert torch.equal(keep[rows[in_head]], best[in_head])  # the rest point at P's argmax among the rows
    assert data.logp is not None and data.logp.shape == (3, 15, keep.numel())
    with pytest.raises(ValueError, match="exit loss"):
        ExitSet.build(private, draft, 1, seqs, start=10, loss="mse")


@pytest.mark.parametrize("loss", ["top1", "kl"])
def test_fitting_raises_agreement_with_p_and_leaves_p_unchanged(private, loss):
    draft = early_exit_draft(private, 1, exit="layer")
    with torch.no_grad():  # an exit far from P (a random model's copied layer already agrees ~95 %)
        g = torch.Generator().manual_seed(4)
        for p in draft.model.layers[1].parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    before = {k: v.clone() for k, v in private.state_dict().items()}
    train = ExitSet.build(private, draft, 1, _sequences(32, 2), start=8, loss=loss)
    held = ExitSet.build(private, draft, 1, _sequences(8, 3), start=8, loss="top1")
    fit = fit_exit(draft, private, 1, train, held, steps=60, batch=8, lr=1e-2, seed=0)
    assert fit.loss == loss and fit.agreement_before < 0.5 < fit.agreement_after
    assert fit.agreement_after == pytest.approx(exit_agreement(draft, private, 1, held))
    assert all(torch.equal(before[k], v) for k, v in private.state_dict().items())
    assert all(p.requires_grad for p in private.parameters())
