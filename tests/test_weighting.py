"""Aggregation weight policies, leave-one-out influence and the fairness report (weighting.py)."""

from __future__ import annotations

import math

import pytest
import torch

from fednode.learning.weighting import (
    DEFAULT_CLIP,
    data_size,
    fairness_aware,
    fairness_report,
    gini,
    jain_index,
    measure_influence,
    q_ffl,
    state_evaluator,
    uniform,
)


def _sums_to_one(w: dict[str, float]) -> None:
    assert math.fsum(w.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(v >= 0 for v in w.values())


def test_uniform_and_data_size():
    assert uniform(["a", "b", "c", "d"]) == {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    w = data_size({"a": 100, "b": 300})
    assert w == {"a": 0.25, "b": 0.75}
    _sums_to_one(data_size({"a": 0, "b": 5}))
    with pytest.raises(ValueError, match="empty"):
        uniform([])
    with pytest.raises(ValueError, match="duplicate"):
        uniform(["a", "a"])
    with pytest.raises(ValueError, match="zero"):
        data_size({"a": 0, "b": 0})
    with pytest.raises(ValueError, match="negative"):
        data_size({"a": -1, "b": 3})
    with pytest.raises(ValueError, match="empty"):
        data_size({})


def test_fairness_aware_formula_by_hand():
    influence = {"a": 0.2, "b": 0.05, "c": -0.3}
    tokens = {"a": 1000, "b": 10, "c": 500}
    w = fairness_aware(influence, tokens, clip=0.5, mix=0.2, damping=1.0, eps=1e-3)
    raw = {
        "a": (0.2 + 1e-3) / (1 + math.log(1001)),
        "b": (0.05 + 1e-3) / (1 + math.log(11)),
        "c": (0.0 + 1e-3) / (1 + math.log(501)),
    }
    total = sum(raw.values())
    for peer in raw:
        assert w[peer] == pytest.approx(0.8 * raw[peer] / total + 0.2 / 3)
    _sums_to_one(w)


def test_fairness_aware_clip_mix_and_floor():
    tokens = {"a": 100, "b": 100}
    # above the clip, more influence buys nothing
    assert fairness_aware({"a": 5.0, "b": 0.1}, tokens, clip=1.0, mix=0.1) == pytest.approx(
        fairness_aware({"a": 1.0, "b": 0.1}, tokens, clip=1.0, mix=0.1)
    )
    # a harmful peer keeps the floor; nothing is ever negative
    w = fairness_aware({"a": 0.3, "b": -10.0}, tokens, clip=1.0, mix=0.25)
    assert w["b"] >= 0.25 / 2 and w["a"] > w["b"]
    _sums_to_one(w)
    assert fairness_aware({"a": 0.3, "b": 0.0}, tokens, clip=1.0, mix=1.0) == {"a": 0.5, "b": 0.5}
    # all unhelpful: equal tokens -> uniform
    assert fairness_aware({"a": -1.0, "b": -2.0}, tokens) == pytest.approx({"a": 0.5, "b": 0.5})


def test_fairness_aware_monotone_in_influence_and_damped_by_tokens():
    tokens = {p: 1000 for p in "abcd"}
    ws = [fairness_aware({"a": x, "b": 0.1, "c": 0.05, "d": 0.0}, tokens)["a"] for x in (0.0, 0.1, 0.2, 0.4)]
    assert all(lo < hi for lo, hi in zip(ws, ws[1:], strict=False))
    assert DEFAULT_CLIP >= 0.4
    # same influence, more data -> less weight (the log damping)
    w = fairness_aware({"a": 0.1, "b": 0.1}, {"a": 10, "b": 1_000_000}, mix=0.0)
    assert w["a"] > w["b"]


@pytest.mark.parametrize(
    ("influence", "tokens", "kwargs", "match"),
    [
        ({}, {}, {}, "empty"),
        ({"a": 0.1}, {"b": 10}, {}, "different peers"),
        ({"a": float("nan")}, {"a": 10}, {}, "finite"),
        ({"a": 0.1}, {"a": -5}, {}, "negative"),
        ({"a": 0.1}, {"a": 5}, {"clip": 0.0}, "clip"),
        ({"a": 0.1}, {"a": 5}, {"mix": 1.5}, "mix"),
    ],
)
def test_fairness_aware_rejects_bad_input(influence, tokens, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fairness_aware(influence, tokens, **kwargs)


def test_q_ffl():
    losses = {"a": 1.0, "b": 2.0, "c": 4.0}
    base = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert q_ffl(losses, 0.0) == pytest.approx(uniform(losses))
    assert q_ffl(losses, 0.0, base) == pytest.approx(base)
    w1 = q_ffl(losses, 1.0)
    assert w1 == pytest.approx({"a": 1 / 7, "b": 2 / 7, "c": 4 / 7})
    w5 = q_ffl(losses, 5.0)
    assert w5["c"] > w1["c"] > 1 / 3  # larger q up-weights the worst peer
    assert w5["a"] < w1["a"]
    huge = q_ffl({"a": 10.0, "b": 20.0}, 2000.0)  # log space: no overflow, all weight on the worst
    assert huge["b"] == pytest.approx(1.0) and huge["a"] >= 0
    _sums_to_one(q_ffl(losses, 3.0, base))
    assert q_ffl({"a": 0.0, "b": 1.0}, 1.0) == {"a": 0.0, "b": 1.0}
    with pytest.raises(ValueError, match="q"):
        q_ffl(losses, -1.0)
    with pytest.raises(ValueError, match="different peers"):
        q_ffl(losses, 1.0, {"a": 1.0})
    with pytest.raises(ValueError, match="empty"):
        q_ffl({}, 1.0)
    with pytest.raises(ValueError, match="zero weight"):
        q_ffl({"a": 0.0}, 1.0)


def test_measure_influence_leave_one_out():
    own = {"w": torch.tensor([0.0, 0.0])}
    contributions = {"good": {"w": torch.tensor([1.0, 1.0])}, "bad": {"w": torch.tensor([-3.0, -3.0])}}
    target = torch.tensor([1.0, 1.0])
    calls = []

    def receiver_eval(state):
        calls.append(state)
        return float(((state["w"] - target) ** 2).mean())

    drop = measure_influence(receiver_eval, own, contributions, {"good": 1.0, "bad": 1.0})
    assert len(calls) == 3
    # all: mean(0, 1, -3) = -2/3 -> loss (5/3)^2; without good: mean(0, -3) = -1.5 -> 6.25; without bad: 0.5 -> 0.25
    assert drop["good"] == pytest.approx(6.25 - 25 / 9)
    assert drop["bad"] == pytest.approx(0.25 - 25 / 9)
    assert drop["good"] > 0 > drop["bad"]
    w = fairness_aware(drop, {"good": 100, "bad": 100})
    assert w["good"] > w["bad"]
    with pytest.raises(ValueError, match="different peers"):
        measure_influence(receiver_eval, own, contributions, {"good": 1.0})
    with pytest.raises(ValueError, match="empty"):
        measure_influence(receiver_eval, own, {}, {})


def test_state_evaluator_runs_a_model_copy():
    from transformers import LlamaConfig, LlamaForCausalLM

    from fednode.learning.models import state_tensors

    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    batches = [torch.randint(32, (2, 8))]
    run = state_evaluator(model, batches)
    own = state_tensors(model)
    zeroed = {k: torch.zeros_like(v) for k, v in own.items()}
    assert run(zeroed) == pytest.approx(math.log(32), rel=1e-4)  # all-zero weights predict uniformly
    assert all(torch.equal(v, own[k]) for k, v in state_tensors(model).items())  # the real model is untouched
    drop = measure_influence(run, own, {"p": zeroed}, {"p": 1.0})
    assert math.isfinite(drop["p"])


def test_fairness_report_by_hand():
    report = fairness_report({"a": 1.0, "b": 2.0, "c": 3.0})
    assert report["worst"] == 3.0 and report["worst_node"] == "c"
    assert report["best"] == 1.0 and report["best_node"] == "a"
    assert report["mean"] == pytest.approx(2.0)
    assert report["spread"] == pytest.approx(2.0)
    assert report["std"] == pytest.approx(math.sqrt(2 / 3))
    assert report["jain"] == pytest.approx(36 / (3 * 14))
    assert report["gini"] == pytest.approx((2 * 1 + 2 * 2 + 2 * 1) / (2 * 9 * 2))  # sum|xi-xj| / (2 n^2 mean)
    assert report["n"] == 3
    equal = fairness_report({"a": 2.0, "b": 2.0})
    assert equal["jain"] == pytest.approx(1.0) and equal["gini"] == 0.0 and equal["spread"] == 0.0
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert gini([0.0, 0.0, 0.0, 4.0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="empty"):
        fairness_report({})
