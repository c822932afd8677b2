"""The knowledge-transfer path: distillation weights, the frozen teacher, the public transfer set,
the capacity-scaling width ladder and the shared-prefix family (pure parts, tiny models)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from fednode.errors import ConfigError
from fednode.learning import messenger as ms
from fednode.learning import prefix, public
from fednode.learning.aggregate import fedavg
from fednode.learning.data import stdlib_files, stdlib_root
from fednode.learning.distill import MutualTrainer, distill_weight, mutual_losses
from fednode.learning.models import build_model, state_tensors
from fednode.learning.tokenizer import build_tokenizer

WIDE = ms.LADDERS["tiny-wide"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=4096)


def test_fixed_weight_is_alpha_and_fedkd_is_rescaled_to_alpha_at_chance():
    assert distill_weight("fixed", 0.7, 6.0, 7.0, 4096) == 0.7
    chance = math.log(4096)
    assert distill_weight("fedkd", 1.0, chance, chance, 4096) == pytest.approx(1.0)
    assert distill_weight("fedkd", 1.0, chance / 2, chance / 2, 4096) == pytest.approx(2.0)  # grows as both fit
    with pytest.raises(ValueError, match="unknown distillation weight"):
        distill_weight("softmax", 1.0, 1.0, 1.0, 10)


def test_the_default_weight_is_of_order_one_for_per_token_losses():
    """The defect that switched distillation off: FedKD's raw 1/(CE_P+CE_M) is ~0.06 at LM losses."""
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12))
    lp, lm = torch.randn(2, 12, 4096), torch.randn(2, 12, 4096)
    raw = mutual_losses(lp, lm, ids)  # alpha None, no rule: FedKD's raw weight
    fixed = mutual_losses(lp, lm, ids, alpha=1.0, weight="fixed")
    assert raw.alpha < 0.1 and fixed.alpha == 1.0


def test_frozen_teacher_replaces_or_joins_the_live_messenger():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (2, 10))
    lp, lm, lt = (torch.randn(2, 10, 64) for _ in range(3))
    live = mutual_losses(lp, lm, ids, alpha=1.0, weight="fixed", teacher_logits=lt, teacher="live")
    frozen = mutual_losses(lp, lm, ids, alpha=1.0, weight="fixed", teacher_logits=lt, teacher="frozen")
    both = mutual_losses(lp, lm, ids, alpha=1.0, weight="fixed", teacher_logits=lt, teacher="both")
    only_t = mutual_losses(lp, lt, ids, alpha=1.0, weight="fixed")
    assert frozen.kl_mp == pytest.approx(only_t.kl_mp, rel=1e-5) and live.kl_mp != pytest.approx(frozen.kl_mp)
    assert both.kl_mp == pytest.approx(0.5 * (live.kl_mp + frozen.kl_mp), rel=1e-5)
    assert frozen.kl_pm == live.kl_pm  # M always learns from P


def test_teacher_snapshot_does_not_follow_the_live_messenger(tok):
    p = build_model("micro", tok, seed=0)
    m = ms.build_messenger(ms.LADDERS["micro"], 0, tok, seed=0)
    trainer = MutualTrainer(p, m, alpha=1.0, weight="fixed", teacher="frozen")
    assert trainer.public_distill_step(torch.randint(0, 4000, (2, 16))) == 0.0  # no snapshot yet: nothing to learn
    trainer.set_frozen_teacher(m)
    before = {k: v.clone() for k, v in state_tensors(trainer.frozen).items()}
    batch = torch.randint(0, 4000, (2, 16))
    trainer.step(batch)
    assert all(torch.equal(before[k], v) for k, v in state_tensors(trainer.frozen).items())
    assert not all(torch.equal(before[k], v) for k, v in state_tensors(m).items())  # the live one moved
    p_before = {k: v.clone() for k, v in state_tensors(p).items()}
    kl = trainer.public_distill_step(batch)
    assert kl > 0 and not all(torch.equal(p_before[k], v) for k, v in state_tensors(p).items())
    assert all(not q.requires_grad for q in trainer.frozen.parameters())


def test_public_set_is_pinned_shipped_and_not_anyones_private_code(tok, tmp_path):
    raw = public.ASSET.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == public.PUBLIC_SHA256 == public.public_hash()
    assert sorted(public.public_sources()) == sorted(public.PUBLIC_MODULES)
    blocks = public.public_blocks(tok, 128)
    assert blocks.shape[1] == 128 and blocks.shape[0] > 500
    assert torch.equal(blocks, public.public_blocks(tok, 128))  # deterministic
    root = stdlib_root()
    partitioned = {p.relative_to(root).as_posix() for p in stdlib_files()}
    assert not partitioned & {f"{m}.py" for m in public.PUBLIC_MODULES}
    bad = tmp_path / "public.json"
    bad.write_bytes(raw.replace(b"def ", b"def  ", 1))
    with pytest.raises(ConfigError, match="does not match its pinned hash"):
        public.public_sources(bad)


def test_width_ladder_levels_differ_for_real_and_reach_the_private_width():
    counts = [ms.level_param_count(WIDE, lv) for lv in range(WIDE.top + 1)]
    assert all(b >= 1.8 * a for a, b in zip(counts, counts[1:], strict=False))
    top = WIDE.levels[-1]
    assert ms.level_hidden(WIDE, top) == 96 and top.num_layers == 4  # the `tiny` private model's width and depth


def test_width_growth_preserves_the_function_and_is_path_independent(tok):
    model = ms.build_messenger(WIDE, 0, tok, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(3):  # trained norms and embeddings, not the init
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref = model(input_ids=ids).logits
    for to in (1, 3):
        grown = ms.grow_model(model, WIDE, to, growth_seed=5, tokenizer=tok)
        # exact up to RMSNorm's eps (relative error ~ eps / mean square of the residual stream)
        assert (grown(input_ids=ids).logits - ref).abs().max() < 1e-2 * ref.abs().max()
    stepwise = ms.grow_model(ms.grow_model(model, WIDE, 1, 5, tok), WIDE, 3, 5, tok)
    direct = ms.grow_model(model, WIDE, 3, 5, tok)
    for a, b in zip(stepwise.parameters(), direct.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    sliced = ms.slice_state(state_tensors(direct), WIDE, 0)
    assert all(torch.equal(sliced[k][tuple(slice(0, s) for s in v.shape)], v) or k.endswith("norm.weight")
               for k, v in state_tensors(model).items())


def test_shared_prefix_levels_slice_and_average_per_coordinate(tok):
    state = state_tensors(build_model("tiny", tok, seed=0))
    top = prefix.top_level(state)
    assert top == 4
    zero = prefix.slice_prefix(state, 0, top)
    assert list(zero) == ["model.embed_tokens.weight"]
    two = prefix.slice_prefix(state, 2, top)
    assert {k.split(".")[2] for k in two if k.startswith("model.layers.")} == {"0", "1"}
    assert "model.norm.weight" not in two and "model.norm.weight" in prefix.slice_prefix(state, top, top)
    assert prefix.slice_prefix(state, top, top).keys() == state.keys()  # the top level is FedAvg
    counts = prefix.level_param_counts(state)
    assert counts == sorted(counts) and counts[-1] == sum(t.numel() for t in state.values())
    other = {k: v + 1.0 for k, v in two.items()}
    merged = fedavg([(zero, 1.0), (other, 1.0)])  # a level-0 peer and a level-2 peer
    assert torch.allclose(merged["model.embed_tokens.weight"], state["model.embed_tokens.weight"] + 0.5)
    assert torch.allclose(merged["model.layers.1.mlp.up_proj.weight"], state["model.layers.1.mlp.up_proj.weight"] + 1)
    with pytest.raises(ValueError, match="outside the shared-prefix ladder"):
        prefix.level_names(list(state), 5, top)


def test_a_frozen_base_is_never_sent_and_level_zero_is_one_layer(tok):
    state = state_tensors(build_model("tiny", tok, seed=0))
    top = prefix.top_level(state, frozen=True)
    assert top == 3  # 4 layers: level k shares k + 1 of them
    zero = prefix.slice_prefix(state, 0, top, frozen=True)
    assert {k.split(".")[2] for k in zero} == {"0"} and all(k.startswith("model.layers.0.") for k in zero)
    whole = prefix.slice_prefix(state, top, top, frozen=True)
    assert whole.keys() == state.keys() - {"model.embed_tokens.weight"}  # the top level: all but the base
    counts = prefix.level_param_counts(state, frozen=True)
    assert len(counts) == 4 and counts == sorted(counts)
    assert counts[0] < prefix.level_param_counts(state)[0] / 2  # the embedding was most of level 0
    same, other = dict(state), dict(state)
    other["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] + 1e-3
    assert prefix.base_hash(same) == prefix.base_hash(state) != prefix.base_hash(other)
    layers_only = {k: v for k, v in state.items() if k.startswith("model.layers.")}
    assert prefix.base_hash(layers_only) != prefix.base_hash(state)  # only the base counts, and it is missing


def test_public_set_shares_no_13_gram_with_humaneval_and_the_check_finds_a_copy():
    from tools.humaneval.data import load_problems
    from tools.humaneval.overlap import overlap

    problems = load_problems(164)
    clean = overlap(public.public_sources().values(), problems)
    assert clean.problems == 164 and clean.overlapping == [] and clean.total_ngrams > 10_000
    leaked = overlap([*public.public_sources().values(), "x = 1\n" + problems[7].prompt], problems)
    assert problems[7].task_id in leaked.overlapping and leaked.shared_ngrams > 0
