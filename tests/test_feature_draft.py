"""The feature draft (EAGLE): cached training pairs, fitting, and the loop that keeps P's greedy output."""

from __future__ import annotations

import pytest
import torch
from helpers_models import FOUR, forced_config, greedy_tokens, random_prompt, sharp_four_layer_model
from transformers import GenerationConfig

from fednode.learning.feature_draft import (
    FeatureDraft,
    FeatureSet,
    feature_agreement,
    features,
    fit_feature_draft,
    load_feature_draft,
    save_feature_draft,
)
from fednode.learning.models import ModelPreset, build_model
from fednode.learning.tokenizer import build_tokenizer
from tools.throughput.draft_tree import TreeShape, lookup_continuation
from tools.throughput.greedy_data import function_prompts, greedy_ragged
from tools.throughput.speculative import (
    banned_ids,
    feature_speculative_greedy,
    feature_tree_greedy,
    time_feature_draft,
    time_speculative,
)

NEW = 30


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=FOUR.vocab_size)


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    return sharp_four_layer_model(tmp_path_factory.mktemp("tok"))


def _prompt(seed: int, n: int = 11) -> list[int]:
    return random_prompt(seed, n)


def _config(private, new: int = NEW) -> GenerationConfig:
    return forced_config(private, new)


def _greedy(private, prompt: list[int], new: int = NEW) -> list[int]:
    return greedy_tokens(private, prompt, new)


@pytest.fixture(scope="module")
def trained(private):
    """A feature draft fitted on P's own greedy continuations: it agrees often enough to test the loop."""
    eos = private.config.eos_token_id
    data = greedy_ragged(private, [_prompt(100 + i, 6 + i % 5) for i in range(80)], new_tokens=40, eos=eos)
    cached = FeatureSet.build(private, data.sequences, data.starts, pad=eos)
    train, held = cached.split(8)
    draft = FeatureDraft(private)
    seen_before = feature_agreement(draft, train)
    fit = fit_feature_draft(draft, train, held, steps=400, batch=16, lr=3e-3, seed=0)
    return draft, fit, held, seen_before, feature_agreement(draft, train)


def test_training_raises_agreement_and_never_touches_p(private, trained):
    draft, fit, held, seen_before, seen_after = trained
    before = {k: v.clone() for k, v in private.state_dict().items()}
    assert seen_after > seen_before + 0.1  # it learns what it is shown (this random P is hard to generalise)
    assert fit.agreement_after > fit.agreement_before
    assert fit.agreement_after == pytest.approx(feature_agreement(draft, held))
    assert all(torch.equal(before[k], v) for k, v in private.state_dict().items())
    own = {id(p) for p in draft.own_parameters()}
    assert not own & {id(p) for p in private.parameters()}  # only fc and the layer copy are the draft's


def test_feature_set_counts_only_positions_whose_input_token_p_wrote(private):
    seqs = [[7, 8, 9, 10, 11], [7, 8, 9]]
    cached = FeatureSet.build(private, seqs, [3, 1], pad=0)
    # position j is (f_j, x_{j+1}); it counts when x_{j+1} is P's own (index >= start), up to the last token
    assert cached.counted.tolist() == [[False, False, True, True], [True, True, False, False]]
    assert cached.features.shape == (2, 5, FOUR.hidden_size)
    with torch.no_grad():
        assert torch.allclose(cached.features[0], features(private, torch.tensor([seqs[0]]))[0], atol=1e-5)
    with pytest.raises(ValueError, match="start"):
        FeatureSet.build(private, [[1, 2]], [3], pad=0)


def test_joined_feature_sets_pad_the_narrower_and_never_count_the_padding(private):
    short = FeatureSet.build(private, [[7, 8, 9]], [1], pad=0)  # real code: every position counts
    wide = FeatureSet.build(private, [[7, 8, 9, 10, 11]], [3], pad=0)
    both = short.join(wide, pad=0)
    assert both.features.shape == (2, 5, FOUR.hidden_size) and len(both) == 2
    assert both.counted.tolist() == [[True, True, False, False], [False, False, True, True]]
    assert both.tokens[0].tolist() == [7, 8, 9, 0, 0] and torch.equal(both.features[0, :3], short.features[0])
    assert torch.equal(both.features[1], wide.features[0]) and not both.features[0, 3:].any()


@pytest.mark.parametrize("length", [1, 3, 7])
def test_the_feature_draft_gives_ps_greedy_tokens(private, trained, length):
    draft = trained[0]
    accepted = 0
    for seed in (1, 2, 3):
        prompt = _prompt(seed)
        out = feature_speculative_greedy(private, draft, prompt, NEW, length, banned_ids(_config(private)))
        assert out.tokens == _greedy(private, prompt)
        assert len(out.tokens) == NEW and out.accepted <= out.proposed
        accepted += out.accepted
    assert accepted > 0  # the trained draft is accepted at times, so the caches were exercised


def _reference_accepted(private, draft, prompt: list[int], new: int, length: int) -> int:
    """The same loop with no cache at all: every forward from scratch (slow, obviously right)."""
    seq, accepted = list(prompt), 0
    with torch.no_grad():
        while len(seq) - len(prompt) < new:
            k = min(length, new - (len(seq) - len(prompt)) - 1) if len(seq) > len(prompt) else 0
            feats = features(private, torch.tensor([seq]))
            drafts: list[int] = []
            f_in, x_in = feats[:, :-1], torch.tensor([seq[1:]])
            for _ in range(k):
                hidden = draft(f_in, x_in)
                drafts.append(int(draft.logits(hidden)[0, -1].argmax()))
                f_in = torch.cat([f_in, hidden[:, -1:]], 1)
                x_in = torch.cat([x_in, torch.tensor([drafts[-1:]])], 1)
            best = private(input_ids=torch.tensor([seq + drafts])).logits[0, -(k + 1):].argmax(-1).tolist()
            m = 0
            while m < k and drafts[m] == best[m]:
                m += 1
            seq += [*drafts[:m], best[m]]
            accepted += m
    return accepted


def test_cached_drafting_proposes_what_an_uncached_draft_would(private, trained):
    draft = trained[0]
    prompt = _prompt(4)
    out = feature_speculative_greedy(private, draft, prompt, 20, 3)
    assert out.accepted == _reference_accepted(private, draft, prompt, 20, 3)


def test_an_always_wrong_feature_draft_still_gives_ps_greedy_tokens(private):
    prompt = _prompt(5)
    greedy = _greedy(private, prompt)
    never = next(t for t in range(5, FOUR.vocab_size) if t not in greedy)
    wrong = FeatureDraft(private).use_subset_head(torch.tensor([never]))
    out = feature_speculative_greedy(private, wrong, prompt, NEW, 4, banned_ids(_config(private)))
    assert out.tokens == greedy and out.accepted == 0 and out.proposed > 0


def test_timed_feature_loop_and_the_draft_alone(private, trained):
    draft = trained[0]
    prompts = [_prompt(6), _prompt(7)]
    run = time_speculative(private, draft, prompts, _config(private, 10), 2)
    assert run.outputs == [_greedy(private, p, 10) for p in prompts]
    assert run.acceptance.new_tokens == 20 and run.tokens_per_s > 0
    alone = time_feature_draft(private, draft, prompts, 5)
    assert alone.tokens == 10 and [len(o) for o in alone.outputs] == [5, 5] and alone.tokens_per_s > 0


def test_greedy_ragged_keeps_each_prompt_and_its_own_continuation(private):
    prompts = [_prompt(8, 4), _prompt(9, 9)]
    data = greedy_ragged(private, prompts, new_tokens=6, eos=private.config.eos_token_id)
    assert data.starts == [4, 9] and data.generated == 12
    for prompt, seq in zip(prompts, data.sequences, strict=True):
        assert seq[:len(prompt)] == prompt and seq[len(prompt):] == _greedy(private, prompt, 6)


def test_function_prompts_are_def_lines_with_docstrings(tmp_path):
    (tmp_path / "a.py").write_text(
        'import os\n\n\ndef walk(top):\n    """Walk a directory tree, top down."""\n    return os.walk(top)\n\n\n'
        'class C:\n    @staticmethod\n    def m(x):\n        """Return x, unchanged."""\n        return x\n\n\n'
        'def bare(x):\n    return x\n')
    (tmp_path / "broken.py").write_text("def (:\n")
    (tmp_path / "latin.py").write_bytes(b"# \xff\n")
    found = sorted(function_prompts([tmp_path / "a.py", tmp_path / "broken.py", tmp_path / "latin.py"], 10, 0))
    assert found == ['@staticmethod\ndef m(x):\n    """Return x, unchanged."""\n',
                     'def walk(top):\n    """Walk a directory tree, top down."""\n']


def test_a_saved_draft_loads_back_exactly_and_a_bad_file_is_one_clear_error(private, trained, tok, tmp_path):
    draft = trained[0]
    subset = FeatureDraft(private).use_subset_head(torch.arange(5, 200))
    with torch.no_grad():
        subset.fc.weight.copy_(draft.fc.weight)
        subset.body.layers[0].load_state_dict(draft.body.layers[0].state_dict())
    path = tmp_path / "d" / "draft.safetensors"
    save_feature_draft(subset, private, path)
    back = load_feature_draft(private, path)
    prompt = torch.tensor([_prompt(10)])
    with torch.no_grad():
        f = features(private, prompt)
        x = prompt[:, 1:]
        assert torch.equal(back.logits(back(f[:, :-1], x)), subset.logits(subset(f[:, :-1], x)))
    assert torch.equal(back.row_ids(), torch.arange(5, 200))
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary file, then renamed
    (tmp_path / "junk").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable feature-draft file.*delete it"):
        load_feature_draft(private, tmp_path / "junk")
    other = build_model(ModelPreset(name="wide", hidden_size=48, intermediate_size=64, num_layers=2, num_heads=2,
                                    vocab_size=FOUR.vocab_size, max_positions=64), tok, seed=0)
    with pytest.raises(ValueError, match="trained for another model"):
        load_feature_draft(other, path)


class _RunnerUp(torch.nn.Module):
    """The trained draft with `never` forced to the top: its own best guess is always its runner-up, so
    only a tree's siblings can be accepted (and each acceptance gathers the cache to a sibling)."""

    def __init__(self, draft: FeatureDraft, never: int) -> None:
        super().__init__()
        self.draft, self.never = draft, never

    def forward(self, *args, **kwargs):
        return self.draft(*args, **kwargs)

    def logits(self, hidden):
        out = self.draft.logits(hidden).clone()
        out[..., self.never] = out.max() + 1.0
        return out


@pytest.mark.parametrize("length", [1, 3])
def test_a_draft_tree_gives_ps_greedy_tokens_and_a_width_of_one_is_the_chain(private, trained, length):
    draft = trained[0]
    banned = banned_ids(_config(private))
    for seed in (1, 2):
        prompt = _prompt(seed)
        chain = feature_speculative_greedy(private, draft, prompt, NEW, length, banned)
        one = feature_tree_greedy(private, draft, prompt, NEW, length, TreeShape(1), banned)
        assert one.tokens == chain.tokens == _greedy(private, prompt)
        assert (one.accepted, one.proposed, one.target_calls) == (chain.accepted, chain.proposed, chain.target_calls)
        for shape in (TreeShape(2), TreeShape(4), TreeShape(1, lookup=True), TreeShape(2, lookup=True, max_nodes=3),
                      TreeShape(1, lookup=True, lookup_depth=5)):
            assert feature_tree_greedy(private, draft, prompt, NEW, length, shape, banned).tokens == chain.tokens


def test_siblings_are_accepted_and_the_cache_follows_them(private, trained):
    prompt = _prompt(3)
    greedy = _greedy(private, prompt)
    never = next(t for t in range(5, FOUR.vocab_size) if t not in greedy)
    runner_up = _RunnerUp(trained[0], never)
    chain = feature_speculative_greedy(private, runner_up, prompt, NEW, 2)
    assert chain.accepted == 0  # its best guess never is P's token
    tree = feature_tree_greedy(private, runner_up, prompt, NEW, 2, TreeShape(2))
    assert tree.tokens == greedy and tree.accepted > 0 and tree.target_calls < chain.target_calls
    with pytest.raises(ValueError, match="width"):
        TreeShape(0)


def test_the_lookup_branch_alone_is_accepted_where_ps_output_repeats_itself(private):
    prompt = _prompt(5)
    greedy = _greedy(private, prompt)
    never = next(t for t in range(5, FOUR.vocab_size) if t not in greedy)
    wrong = FeatureDraft(private).use_subset_head(torch.tensor([never]))  # its guesses never are P's
    out = feature_tree_greedy(private, wrong, prompt, NEW, 3, TreeShape(1, lookup=True))
    assert out.tokens == greedy
    seq, hits = [*prompt, *greedy], 0  # how often the lookup's first token is P's next one (after the first)
    for t in range(len(prompt) + 1, len(seq)):
        guess = lookup_continuation(seq[:t], 1)
        hits += bool(guess) and guess[0] == seq[t]
    assert hits > 0 and out.accepted > 0  # only the lookup branch can have been accepted
