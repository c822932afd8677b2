"""Our own greedy speculative loop (tools.throughput.speculative) gives exactly P's greedy tokens."""

from __future__ import annotations

import pytest
import torch
from helpers_models import FOUR, forced_config, greedy_tokens, random_prompt, sharp_four_layer_model
from transformers import GenerationConfig

from fednode.learning.early_exit import early_exit_draft, with_subset_head
from tools.throughput.speculative import banned_ids, speculative_greedy, time_speculative

NEW = 30


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    return sharp_four_layer_model(tmp_path_factory.mktemp("tok"))


def _config(private, new: int = NEW) -> GenerationConfig:
    return forced_config(private, new)


def _prompt(seed: int) -> list[int]:
    return random_prompt(seed)


def _greedy(private, prompt: list[int], new: int = NEW) -> list[int]:
    return greedy_tokens(private, prompt, new)


@pytest.mark.parametrize("length", [1, 3, 7])
def test_the_early_exit_draft_gives_ps_greedy_tokens(private, length):
    draft = early_exit_draft(private, 2, exit="layer")
    for seed in (1, 2):
        prompt = _prompt(seed)
        out = speculative_greedy(private, draft, prompt, NEW, length, banned_ids(_config(private)))
        assert out.tokens == _greedy(private, prompt)
        assert out.acceptance.new_tokens == NEW and out.accepted <= out.proposed


def test_a_draft_that_is_always_wrong_still_gives_ps_greedy_tokens(private):
    prompt = _prompt(3)
    greedy = _greedy(private, prompt)
    never = next(t for t in range(5, FOUR.vocab_size) if t not in greedy)
    wrong = with_subset_head(early_exit_draft(private, 1), torch.tensor([never]))  # proposes only `never`
    out = speculative_greedy(private, wrong, prompt, NEW, 4, banned_ids(_config(private)))
    assert out.tokens == greedy
    assert out.accepted == 0 and out.proposed > 0 and out.target_calls == NEW  # one target call per token


def test_p_as_its_own_draft_is_accepted_every_time(private):
    itself = early_exit_draft(private, FOUR.num_layers)  # every layer and a copy of P's final norm: P
    prompt = _prompt(4)
    out = speculative_greedy(private, itself, prompt, NEW, 4, banned_ids(_config(private)))
    assert out.tokens == _greedy(private, prompt)
    assert out.accepted == out.proposed  # every draft token accepted
    assert out.target_calls == -(-NEW // 5)  # 4 drafts + the target's own token per call


def test_eos_is_never_generated_when_the_length_is_forced(private):
    prompt = _prompt(5)
    eos = private.config.eos_token_id
    itself = early_exit_draft(private, FOUR.num_layers)
    with torch.no_grad():  # make EOS P's favourite token everywhere: the loop must still mask it
        private.lm_head.weight[eos] += 50.0
    try:
        out = speculative_greedy(private, itself, prompt, 12, 3, banned_ids(_config(private, 12)))
        assert eos not in out.tokens and out.tokens == _greedy(private, prompt, 12)
    finally:
        with torch.no_grad():
            private.lm_head.weight[eos] -= 50.0
    assert banned_ids(GenerationConfig(max_new_tokens=8, min_new_tokens=2, eos_token_id=eos)) == ()


def test_timed_loop_reports_acceptance_and_refuses_an_unforced_length(private):
    draft = early_exit_draft(private, 2)
    prompts = [_prompt(6), _prompt(7)]
    run = time_speculative(private, draft, prompts, _config(private, 10), 2)
    assert run.outputs == [_greedy(private, p, 10) for p in prompts]
    a = run.acceptance
    assert a.new_tokens == 20 and a.accepted == a.new_tokens - a.target_calls and run.tokens_per_s > 0
    with pytest.raises(ValueError, match="min_new_tokens"):
        time_speculative(private, draft, prompts, GenerationConfig(max_new_tokens=10), 2)
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        speculative_greedy(private, draft, prompts[0], 0, 2)
