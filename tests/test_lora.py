"""The `lora` family on real learners (micro preset, real partitions, peft): only the shared
adapter's rank prefix travels, growth is function-preserving and seed-agreed, peers at lower
ranks merge per coordinate, the private adapter and the base never leave, and a bad ladder is a
one-line error."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fednode.config import ConfigError, load_config, to_toml
from fednode.errors import ProtocolError, Reason
from fednode.learning import lora
from fednode.learning.merge import Contribution
from fednode.node.learner import build_learner
from fednode.node.lora_learner import LoraLearner
from tools.harness.sim import sim_configs

TRAIN = {"steps_per_round": 2, "batch_size": 2, "threads": 1, "lr": 0.02}
RANKS = (2, 4, 8)


def _configs(tmp_path, n=2, **learning):
    return sim_configs(tmp_path, n, overrides={"model": {"preset": "micro"}, "train": TRAIN,
                                                "learning": {"curriculum": False, "family": "lora",
                                                             "lora_ranks": list(RANKS), "lora_private_rank": 2,
                                                             **learning}}, code_bytes=20_000)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_only_the_shared_adapters_rank_prefix_travels(tmp_path):
    cfg = _configs(tmp_path, 1, mode="static", static_level=1)[0]
    learner = build_learner(cfg)
    assert isinstance(learner, LoraLearner) and learner.level == 1 and learner.top_level == 2
    shared = learner.shared_state()
    assert shared and all(".lora_A." in k or ".lora_B." in k for k in shared)
    assert not any("private" in k or "base_layer" in k or "embed" in k for k in shared)  # base and own adapter stay
    for name, t in shared.items():
        assert (t.shape[0] if ".lora_A." in name else t.shape[1]) == RANKS[1], (name, t.shape)
    learner.validate(shared, 1)
    with pytest.raises(ProtocolError) as err:
        learner.validate(lora.slice_rank(shared, 2), 1)  # rank 2 labelled level 1 (rank 4)
    assert err.value.reason == Reason.SHAPE_MISMATCH
    with pytest.raises(ProtocolError) as err:
        learner.validate(shared, 3)
    assert err.value.reason == Reason.BAD_LEVEL
    assert learner.update_spec().largest_shapes == tuple(lora.level_shapes(learner.full_shapes, RANKS[-1]).values())


def test_training_leaves_the_components_above_the_rank_untouched(tmp_path):
    learner = build_learner(_configs(tmp_path, 1, mode="static", static_level=0)[0])
    before = {n: p.detach().clone() for n, p in learner.params.items()}
    learner.train_round(1)
    learner.train_round(2)
    moved = False
    for n, p in learner.params.items():
        a = ".lora_A." in n
        above, above_before = (p[RANKS[0]:], before[n][RANKS[0]:]) if a else (p[:, RANKS[0]:], before[n][:, RANKS[0]:])
        assert torch.equal(above, above_before), n  # masked: B stays 0 there, so they change nothing
        if not a:
            assert not above.any(), n
        moved |= not torch.equal(p, before[n])
    assert moved  # the active components did train


def test_growth_is_function_preserving_and_every_peer_draws_the_same_new_rows(tmp_path):
    a_cfg, b_cfg = _configs(tmp_path, 2, mode="adaptive")
    a, b = build_learner(a_cfg), build_learner(b_cfg)
    assert torch.equal(torch.cat([t.flatten() for t in a.shared_state().values()]),
                       torch.cat([t.flatten() for t in b.shared_state().values()]))  # one shared init
    a.train_round(1)
    b.train_round(1)
    loss = a.merge([], {})
    a.set_level(2, growth_seed=77)
    b.set_level(2, growth_seed=77)
    assert a.merge([], {}) == pytest.approx(loss, abs=1e-9)  # B = 0 on the new components: P unchanged
    for n in a.params:
        if ".lora_A." in n:  # the new rows come from the agreement's seed, not from each site's training
            assert torch.equal(a.params[n][RANKS[0]:RANKS[2]], b.params[n][RANKS[0]:RANKS[2]]), n
    a.train_round(2)
    assert any(a.params[n][:, RANKS[0]:].any() for n in a.params if ".lora_B." in n)  # now they train
    a.set_level(0, growth_seed=77)  # shrink: the dropped columns of B are zeroed
    assert not any(a.params[n][:, RANKS[0]:].any() for n in a.params if ".lora_B." in n)


def test_a_lower_rank_peer_merges_per_coordinate(tmp_path):
    hi_cfg, lo_cfg = _configs(tmp_path, 2, mode="static", static_level=2)
    hi = build_learner(hi_cfg)
    lo = build_learner(dataclasses.replace(lo_cfg, learning=dataclasses.replace(lo_cfg.learning, static_level=0)))
    hi.train_round(1)
    lo.train_round(1)
    own, low = hi.shared_state(), lo.shared_state()
    hi.cfg = dataclasses.replace(hi.cfg, learning=dataclasses.replace(hi.cfg.learning, aggregation="mean",
                                                                      weighting="uniform"))
    hi.merge([Contribution("lo", low, 1.0)], {})
    merged = hi.shared_state()
    for n, t in merged.items():
        if ".lora_A." in n:
            torch.testing.assert_close(t[:RANKS[0]], (own[n][:RANKS[0]] + low[n]) / 2)
            torch.testing.assert_close(t[RANKS[0]:], own[n][RANKS[0]:])  # only we hold these rows
        else:
            torch.testing.assert_close(t[:, :RANKS[0]], (own[n][:, :RANKS[0]] + low[n]) / 2)
            torch.testing.assert_close(t[:, RANKS[0]:], own[n][:, RANKS[0]:])


def test_a_restored_lora_learner_continues_exactly(tmp_path):
    cfg = _configs(tmp_path, 1, mode="static", static_level=1)[0]
    first = build_learner(cfg)
    first.train_round(1)
    saved = first.checkpoint_state()
    assert any(k.startswith("optim.") for k in saved) and any(".lora_A.private." in k for k in saved)
    assert not any("base_layer" in k or "embed_tokens" in k for k in saved)  # the frozen base is rebuilt
    second = build_learner(cfg)
    second.restore(saved, {"level": "1"})
    first.train_round(2)
    second.train_round(2)
    a, b = first.checkpoint_state(), second.checkpoint_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_different_base_or_ladder_is_another_family(tmp_path):
    base = build_learner(_configs(tmp_path / "a", 1)[0]).info.family_hash
    other_seed = _configs(tmp_path / "b", 1)[0]
    other_seed = dataclasses.replace(other_seed, model=dataclasses.replace(other_seed.model, seed=5))
    assert build_learner(other_seed).info.family_hash != base  # another random base: the handshake refuses it
    assert build_learner(_configs(tmp_path / "c", 1, lora_ranks=[2, 4])[0]).info.family_hash != base
    assert build_learner(_configs(tmp_path / "d", 1, lora_private_rank=4)[0]).info.family_hash == base  # ours


@pytest.mark.parametrize(("learning", "words"), [
    ({"lora_ranks": [4, 4]}, "must rise strictly"),
    ({"lora_ranks": []}, "non-empty list of integers"),
    ({"lora_ranks": ["4"]}, "non-empty list of integers"),
    ({"lora_private_rank": -1}, "lora_private_rank -1"),
])
def test_a_bad_ladder_is_a_one_line_config_error(tmp_path, learning, words):
    path = tmp_path / "n.toml"
    path.write_text(to_toml({"node": {"name": "n"}, "learning": {"family": "lora", **learning}}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_ranks_the_model_cannot_hold_are_a_one_line_error(tmp_path):
    cfg = _configs(tmp_path, 1, lora_ranks=[8, 64])[0]  # micro's projections are 32 wide
    with pytest.raises(ConfigError) as err:
        build_learner(cfg)
    assert "no rank may exceed 32" in str(err.value) and "\n" not in str(err.value)


def test_without_peft_the_lora_family_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now fails as if it were not installed
    with pytest.raises(ConfigError) as err:
        build_learner(_configs(tmp_path, 1)[0])
    assert 'pip install "fednode[lora]"' in str(err.value) and "\n" not in str(err.value)


def test_attaching_adapters_leaves_torchs_global_generator_alone(tmp_path):
    """peft's own A draw came from the global generator, unlocked: interleaved with another node's
    seeded build in one process (the sim harness), that node's base came out different, its family
    hash too, and the two never formed a mesh (the LoRA smoke hung in CI waiting for membership)."""
    from fednode.learning.models import build_model
    from fednode.learning.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path / "tok", vocab_size=4096)
    model = build_model("micro", tok, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    lora.attach(model, 4, 2, private_seed=7)
    assert torch.equal(torch.rand(4), expected)
