"""Mutual distillation (distill.py) and the probe heterogeneity signal (probe.py) on micro models."""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fednode.learning.data import TokenDataset
from fednode.learning.distill import MutualTrainer, adaptive_alpha, mutual_losses, prediction_mask
from fednode.learning.probe import (
    MAX_SIGNATURE_BYTES,
    PROBE_TEXT_SHA256,
    ProbeSignature,
    js_divergence,
    mean_pairwise_js,
    next_token_distributions,
    probe_blocks,
    probe_hash,
    probe_positions,
    probe_signature,
    probe_text_sha256,
)
from fednode.learning.tokenizer import build_tokenizer

VOCAB = 48
SEQ = 16
PAD = 0


def micro_model(seed: int, layers: int = 1, vocab: int = VOCAB) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).float()


def structured_blocks(n: int, seed: int) -> torch.Tensor:
    """Arithmetic runs (start random, step 1..3) mod VOCAB-1, shifted past PAD: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(VOCAB - 1, (n, 1), generator=gen)
    step = torch.randint(1, 4, (n, 1), generator=gen)
    return ((start + step * torch.arange(SEQ)) % (VOCAB - 1) + 1).to(torch.int32)


def forward(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.long(), use_cache=False).logits


# --- mutual_losses -----------------------------------------------------------------------------


def test_identical_models_have_zero_kl():
    p = micro_model(1)
    m = copy.deepcopy(p)
    ids = structured_blocks(4, 0).long()
    out = mutual_losses(forward(p, ids), forward(m, ids), ids)
    assert out.kl_pm == pytest.approx(0.0, abs=1e-6)
    assert out.kl_mp == pytest.approx(0.0, abs=1e-6)
    assert out.ce_p == pytest.approx(out.ce_m, abs=1e-6)
    assert out.loss_p.item() == pytest.approx(out.ce_p, abs=1e-5)


def test_different_models_have_positive_kl_and_adaptive_alpha():
    p, m = micro_model(1, layers=2), micro_model(2)
    ids = structured_blocks(4, 0).long()
    out = mutual_losses(forward(p, ids), forward(m, ids), ids)
    assert out.kl_pm > 0 and out.kl_mp > 0
    assert out.alpha == pytest.approx(1.0 / (out.ce_p + out.ce_m))
    assert out.alpha == adaptive_alpha(out.ce_p, out.ce_m)
    assert out.loss_p.item() == pytest.approx(out.ce_p + out.alpha * out.kl_mp, rel=1e-5)
    assert out.loss_m.item() == pytest.approx(out.ce_m + out.alpha * out.kl_pm, rel=1e-5)
    fixed = mutual_losses(forward(p, ids), forward(m, ids), ids, alpha=0.3)
    assert fixed.alpha == 0.3
    assert fixed.loss_p.item() == pytest.approx(fixed.ce_p + 0.3 * fixed.kl_mp, rel=1e-5)


def test_kl_matches_hand_computation_with_temperature():
    torch.manual_seed(0)
    lp, lm = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    ids = torch.randint(7, (2, 5))
    t = 2.0
    out = mutual_losses(lp, lm, ids, alpha=1.0, temperature=t)
    qp, qm = torch.softmax(lp[:, :-1] / t, -1), torch.softmax(lm[:, :-1] / t, -1)
    kl_mp = (qm * (qm.log() - qp.log())).sum(-1).mean() * t * t
    kl_pm = (qp * (qp.log() - qm.log())).sum(-1).mean() * t * t
    assert out.kl_mp == pytest.approx(float(kl_mp), rel=1e-5)
    assert out.kl_pm == pytest.approx(float(kl_pm), rel=1e-5)


def test_gradients_do_not_cross_between_models():
    p, m = micro_model(1, layers=2), micro_model(2)
    ids = structured_blocks(4, 0).long()
    out = mutual_losses(forward(p, ids), forward(m, ids), ids)
    out.loss_m.backward(retain_graph=True)
    assert all(param.grad is None for param in p.parameters())
    assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in m.parameters())
    m.zero_grad(set_to_none=True)
    out.loss_p.backward()
    assert all(param.grad is None for param in m.parameters())
    assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in p.parameters())


def test_padding_positions_are_ignored():
    torch.manual_seed(0)
    lp, lm = torch.randn(2, 6, 9), torch.randn(2, 6, 9)
    ids = torch.randint(1, 9, (2, 6))
    ids[1, 4:] = PAD  # right padding on the second row
    out = mutual_losses(lp, lm, ids, pad_id=PAD)
    assert out.tokens == 5 + 3
    # garbage in the padded positions' logits and targets changes nothing
    lp2, lm2, ids2 = lp.clone(), lm.clone(), ids.clone()
    lp2[1, 3:] += 100 * torch.randn(3, 9)  # position 3 predicts a pad target, 4 and 5 read pad inputs
    lm2[1, 3:] += 100 * torch.randn(3, 9)
    again = mutual_losses(lp2, lm2, ids2, pad_id=PAD)
    assert again.ce_p == pytest.approx(out.ce_p) and again.kl_pm == pytest.approx(out.kl_pm)
    # equals the loss over the unpadded rows alone, weighted per token
    row0 = mutual_losses(lp[:1], lm[:1], ids[:1])
    row1 = mutual_losses(lp[1:, :4], lm[1:, :4], ids[1:, :4])
    assert out.ce_p == pytest.approx((5 * row0.ce_p + 3 * row1.ce_p) / 8, rel=1e-5)
    assert out.kl_mp == pytest.approx((5 * row0.kl_mp + 3 * row1.kl_mp) / 8, rel=1e-5)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    via_mask = mutual_losses(lp, lm, ids, attention_mask=mask)
    assert via_mask.ce_m == pytest.approx(out.ce_m)


def test_prediction_mask_and_errors():
    ids = torch.tensor([[PAD, 5, 6, PAD]])
    assert prediction_mask(ids, pad_id=PAD).tolist() == [[False, True, False]]
    with pytest.raises(ValueError, match="padding"):
        mutual_losses(torch.zeros(1, 4, 9), torch.zeros(1, 4, 9), torch.full((1, 4), PAD), pad_id=PAD)
    with pytest.raises(ValueError, match="tokenizer"):
        mutual_losses(torch.zeros(1, 4, 9), torch.zeros(1, 4, 8), torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        mutual_losses(torch.zeros(1, 4, 9), torch.zeros(1, 4, 9), torch.ones(1, 4, dtype=torch.long), temperature=0)


# --- MutualTrainer -----------------------------------------------------------------------------


@pytest.fixture()
def dataset() -> TokenDataset:
    return TokenDataset(structured_blocks(256, 0), structured_blocks(16, 1))


def test_mutual_training_lowers_both_losses(dataset):
    torch.manual_seed(0)
    trainer = MutualTrainer(micro_model(1, layers=2), micro_model(2), lr_private=1e-2, lr_messenger=1e-2)
    result = trainer.train(dataset, steps=40, batch_size=16, seed=0)
    assert result.p_loss_after < result.p_loss_before - 0.5
    assert result.m_loss_after < result.m_loss_before - 0.5
    assert result.steps == 40 and result.tokens == 40 * 16 * SEQ and result.seconds > 0
    assert result.alpha > 0 and result.kl_pm >= 0 and result.kl_mp >= 0
    assert math.isfinite(result.ce_p) and math.isfinite(result.ce_m)


def test_trainer_is_deterministic_and_uses_batch_filter(dataset):
    def run(batch_filter=None):
        trainer = MutualTrainer(micro_model(1), micro_model(2))
        return trainer.train(dataset, steps=3, batch_size=4, seed=7, batch_filter=batch_filter)

    first, second = run(), run()
    assert (first.ce_p, first.kl_pm, first.p_loss_after) == (second.ce_p, second.kl_pm, second.p_loss_after)
    seen = []

    def only_first_blocks(batch_size, generator):
        idx = torch.randint(4, (batch_size,), generator=generator)
        seen.append(idx)
        return idx

    run(only_first_blocks)
    assert len(seen) == 3 and all(int(i.max()) < 4 for i in seen)


def test_set_messenger_keeps_private_optimizer(dataset):
    trainer = MutualTrainer(micro_model(1), micro_model(2))
    trainer.train(dataset, steps=2, batch_size=4, seed=0)
    opt_p = trainer.opt_private
    state_before = {k: v["exp_avg"].clone() for k, v in enumerate(opt_p.state.values())}
    bigger = micro_model(3, layers=2)
    trainer.set_messenger(bigger)
    assert trainer.messenger is bigger and trainer.opt_private is opt_p
    assert {id(p) for g in trainer.opt_messenger.param_groups for p in g["params"]} == {
        id(p) for p in bigger.parameters()
    }
    assert all(torch.equal(v["exp_avg"], state_before[k]) for k, v in enumerate(opt_p.state.values()))
    own = torch.optim.AdamW(bigger.parameters(), lr=1e-4)
    trainer.set_messenger(bigger, own)
    assert trainer.opt_messenger is own
    result = trainer.train(dataset, steps=2, batch_size=4, seed=1)
    assert math.isfinite(result.m_loss_after)


# --- probe -------------------------------------------------------------------------------------


def test_js_divergence_properties():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(3, 10), -1)
    q = torch.softmax(torch.randn(3, 10), -1)
    assert js_divergence(p, p) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(p, q) == pytest.approx(js_divergence(q, p), rel=1e-12)
    assert 0 < js_divergence(p, q) <= math.log(2)
    disjoint_a, disjoint_b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert js_divergence(disjoint_a, disjoint_b) == pytest.approx(math.log(2))
    assert mean_pairwise_js([p, p.clone(), p.clone()]) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_js([p]) == 0.0
    assert mean_pairwise_js([p, q, p]) == pytest.approx(2 * js_divergence(p, q) / 3)
    with pytest.raises(ValueError):
        mean_pairwise_js([])


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokcache"))


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="probe modules were checked identical on CPython 3.11-3.13")
def test_probe_text_is_the_pinned_public_stdlib_slice():
    assert probe_text_sha256() == PROBE_TEXT_SHA256


def test_probe_blocks_are_fixed_and_deterministic(tok):
    a, b = probe_blocks(tok, n=8, seq_len=64), probe_blocks(tok, n=8, seq_len=64)
    assert a.shape == (8, 64) and torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 8  # spread out, not repeated
    assert probe_hash(a) == probe_hash(b) != probe_hash(probe_blocks(tok, n=4, seq_len=64))
    assert probe_positions(64, 8) == [7, 15, 23, 31, 39, 47, 55, 63]


def test_probe_signature_size_round_trip_and_divergence(tok):
    blocks = probe_blocks(tok)
    vocab = 4096
    m1, m2 = micro_model(1, vocab=vocab), micro_model(2, vocab=vocab)
    dist = next_token_distributions(m1, blocks)
    assert dist.shape == (8, 64, vocab) and torch.allclose(dist.sum(-1), torch.ones(8, 64))
    s1, s1b, s2 = probe_signature(m1, blocks), probe_signature(copy.deepcopy(m1), blocks), probe_signature(m2, blocks)
    wire = s1.to_bytes()
    assert len(wire) < MAX_SIGNATURE_BYTES
    back = ProbeSignature.from_bytes(wire)
    assert torch.equal(back.ids, s1.ids) and torch.equal(back.probs, s1.probs) and back.probe == s1.probe
    assert js_divergence(s1, back) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(s1, s1b) == pytest.approx(0.0, abs=1e-9)
    assert torch.allclose(s1.dense().sum(-1), torch.ones(64, dtype=torch.float64))
    js12 = js_divergence(s1, s2)
    assert 0 < js12 <= math.log(2)
    assert js12 == pytest.approx(js_divergence(s2, s1))
    assert mean_pairwise_js([s1, s1b]) == pytest.approx(0.0, abs=1e-9)
    assert mean_pairwise_js([s1, s2, s1b]) > 0
    other = probe_signature(m1, probe_blocks(tok, n=4))
    with pytest.raises(ValueError, match="different probes"):
        js_divergence(s1, other)
    with pytest.raises(ValueError):
        ProbeSignature.from_bytes(wire[:-1])
