"""The learners behind the round loop, built from real configs on real partitions (no mesh):
checkpoints that carry Adam's moments, the frozen teacher after a merge, catch-up growth with the
committed seed, and the shared-prefix learner's slicing, validation and merge."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fednode.errors import ProtocolError, Reason
from fednode.learning.merge import Contribution
from fednode.learning.models import state_tensors
from fednode.node.learner import LocalModelLearner, MessengerLearner, build_learner
from fednode.node.prefix_learner import PrefixLearner
from tools.harness.sim import sim_configs

TRAIN = {"steps_per_round": 2, "batch_size": 2, "threads": 1}


def _configs(tmp_path, learning, n=2, preset="micro"):
    return sim_configs(tmp_path, n, overrides={"model": {"preset": preset}, "train": TRAIN,
                                                "learning": {"curriculum": False, **learning}}, code_bytes=20_000)


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("learning", [{"mode": "static", "public_steps": 2}, {"mode": "fedavg"},
                                      {"mode": "static", "family": "shared-prefix", "static_level": 1}])
def test_a_restored_learner_continues_training_exactly(tmp_path, learning):
    cfg = _configs(tmp_path, learning, n=1)[0]
    first = build_learner(cfg)
    first.train_round(1)
    first.merge([], {})
    saved = first.checkpoint_state()
    assert any(k.startswith("optim.") for k in saved)  # Adam's moments travel with the checkpoint
    second = build_learner(cfg)
    second.restore(saved, {"level": str(first.level)})
    first.train_round(2)
    second.train_round(2)
    assert _same_state(first.checkpoint_state(), second.checkpoint_state())


def test_restore_without_optimizer_state_starts_fresh_moments(tmp_path):
    cfg = _configs(tmp_path, {"mode": "fedavg"}, n=1)[0]
    learner = LocalModelLearner(cfg)
    learner.restore(state_tensors(learner.model), {})  # an old checkpoint: model tensors only
    assert not learner.trainer.optimizer.state


def test_merge_sets_the_frozen_teacher_and_public_steps_run(tmp_path):
    a_cfg, b_cfg = _configs(tmp_path, {"mode": "static", "public_steps": 3})
    a, b = MessengerLearner(a_cfg), MessengerLearner(b_cfg)
    a.train_round(1)
    assert a.last_result.public_steps == 0  # no merged messenger yet: nothing to distil from
    b.train_round(1)
    a.merge([Contribution("b", b.shared_state(), b.weight())], {})
    assert _same_state(state_tensors(a.trainer.frozen), a.shared_state())
    a.train_round(2)
    assert a.last_result.public_steps == 3 and a.last_result.kl_public > 0
    assert not _same_state(state_tensors(a.trainer.frozen), a.shared_state())  # the live one moved on


def test_catch_up_growth_uses_the_committed_seed(tmp_path):
    cfg = _configs(tmp_path, {"mode": "adaptive"}, n=1)[0]
    low, high = MessengerLearner(cfg), MessengerLearner(cfg)
    high.set_level(2, growth_seed=77)
    high.set_level(2, growth_seed=77)
    low_state = low.shared_state()
    high.adopt_shared(low_state, 0)  # a level-0 donor: grown to our level with the agreement's seed
    expected = MessengerLearner(cfg)
    expected.adopt_shared(low_state, 0)
    expected.set_level(2, growth_seed=77)
    assert _same_state(high.shared_state(), expected.shared_state())


def test_shared_prefix_learner_shares_validates_and_merges_only_its_prefix(tmp_path):
    a_cfg, b_cfg = _configs(tmp_path, {"mode": "static", "family": "shared-prefix", "static_level": 1})
    a, b = PrefixLearner(a_cfg), PrefixLearner(b_cfg)
    assert a.top_level == 2 and a.level == 1  # micro: 2 layers
    shared = a.shared_state()
    assert "model.embed_tokens.weight" in shared and not any(k.startswith("model.layers.1.") for k in shared)
    b.train_round(1)
    a.validate(b.shared_state(), 1)
    with pytest.raises(ProtocolError) as err:
        a.validate(b.shared_state(), 2)
    assert err.value.reason == Reason.SHAPE_MISMATCH
    before = state_tensors(a.private)
    peer = {k: v + 1.0 for k, v in b.shared_state().items()}
    a.merge([Contribution("b", peer, a.weight())], {})
    after = state_tensors(a.private)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in shared), name  # the local rest of P is untouched
    assert a.info.family_hash != MessengerLearner(a_cfg).info.family_hash  # the handshake refuses a mix


def test_a_frozen_base_is_not_trained_not_sent_and_checked_at_the_handshake(tmp_path):
    learning = {"mode": "static", "family": "shared-prefix", "static_level": 0, "frozen_base": "on"}
    a_cfg, b_cfg = _configs(tmp_path, learning)
    a, b = PrefixLearner(a_cfg), PrefixLearner(b_cfg)
    assert a.top_level == 1 and list(a.shared_state()) and all(k.startswith("model.layers.0.")
                                                                 for k in a.shared_state())
    embed = state_tensors(a.private)["model.embed_tokens.weight"]
    a.train_round(1)
    after = state_tensors(a.private)
    assert torch.equal(after["model.embed_tokens.weight"], embed)  # frozen: identical at every site
    assert not torch.equal(after["model.layers.0.mlp.up_proj.weight"], state_tensors(b.private)[
        "model.layers.0.mlp.up_proj.weight"])  # the layers did train
    b.validate(a.shared_state(), 0)
    assert a.update_spec().largest_shapes and all(
        shape != tuple(embed.shape) for shape in a.update_spec().largest_shapes)
    assert a.info.family_hash == b.info.family_hash  # one public base
    unfrozen = PrefixLearner(_configs(tmp_path / "u", {**learning, "frozen_base": "off"}, n=1)[0])
    assert unfrozen.info.family_hash != a.info.family_hash  # a frozen and an unfrozen site never mix
    reseeded = _configs(tmp_path / "r", learning, n=1)[0]
    reseeded = dataclasses.replace(reseeded, model=dataclasses.replace(reseeded.model, seed=99))
    assert PrefixLearner(reseeded).info.family_hash != a.info.family_hash  # another base: refused


def test_the_largest_update_a_prefix_learner_accepts_is_its_top_level_whatever_its_level(tmp_path):
    """The receive limit is fixed at start (level 0 for adaptive): sized from the shared state then,
    every push after a growth was refused OVERSIZE and the prefix mesh stopped merging."""
    from fednode.node.peer_service import update_size_limit

    cfg = _configs(tmp_path, {"mode": "adaptive", "family": "shared-prefix"}, n=1)[0]
    learner = PrefixLearner(cfg)
    assert learner.level == 0
    top = sorted(tuple(t.shape) for t in state_tensors(learner.private).values())
    assert sorted(learner.update_spec().largest_shapes) == top
    learner.set_level(learner.top_level, 0)
    grown = sum(t.numel() * t.element_size() for t in learner.shared_state().values())
    assert grown < update_size_limit(learner.update_spec().largest_shapes)
    assert learner.update_spec().dtypes == {torch.float32}


@pytest.mark.parametrize("learning", [{"mode": "static"}, {"mode": "fedavg"},
                                      {"mode": "static", "family": "shared-prefix", "static_level": 1}])
def test_a_merge_that_makes_held_out_loss_jump_is_refused_and_the_own_state_kept(tmp_path, learning):
    """Every learner: a peer state replaced by large noise (it passes shape and finiteness) under
    plain `mean` pulls the merge to a loss far above the own one: LOSS_JUMP, own state back; an
    honest peer merges."""
    from fednode.learning.merge import MergeRefused

    a_cfg, b_cfg = _configs(tmp_path, {**learning, "aggregation": "mean"})
    a, b = build_learner(a_cfg), build_learner(b_cfg)
    a.train_round(1)
    b.train_round(1)
    own = a.shared_state()
    hostile = {k: torch.randn_like(v) * 3 if v.is_floating_point() else v for k, v in b.shared_state().items()}
    with pytest.raises(MergeRefused) as err:
        a.merge([Contribution("b", hostile, a.weight())], {})
    assert err.value.reason == Reason.LOSS_JUMP and err.value.peers == ["b"]
    assert _same_state(a.shared_state(), own)
    a.merge([Contribution("b", b.shared_state(), b.weight())], {})  # the honest state is merged
    assert not _same_state(a.shared_state(), own)


def test_loss_jump_decision():
    from fednode.learning.merge import MergeRefused, check_loss_jump

    check_loss_jump(4.0, 4.99, 0.25, ["p"])  # within +25 %
    check_loss_jump(float("nan"), 9.0, 0.25, ["p"])  # nothing to compare with
    check_loss_jump(4.0, 100.0, 0.0, ["p"])  # off
    for after in (5.01, float("nan"), float("inf")):
        with pytest.raises(MergeRefused) as err:
            check_loss_jump(4.0, after, 0.25, ["p", "q"])
        assert err.value.reason == Reason.LOSS_JUMP and err.value.peers == ["p", "q"]
