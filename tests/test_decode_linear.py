"""DecodeLinear: every layout computes F.linear's product, shares the layer's weight, and the plan is a
pure, measured choice (tools.throughput.decode_plan times it on a real model)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fednode.learning.decode_linear import (
    LAYOUTS,
    LINEAR,
    W_XT,
    X_WT,
    DecodeLinear,
    check_plan,
    choose_layouts,
    install,
)
from tests.helpers_models import four_layer_model, greedy_tokens, random_prompt
from tools.throughput.decode_plan import decode_layout, tune_decode_plan
from tools.throughput.speculative import MAX_VERIFY


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_every_layout_computes_the_linear_product(layout, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=bias)
    fast = DecodeLinear(layer, {n: layout for n in range(1, 5)})
    for shape in [(1, 1, 24), (1, 3, 24), (2, 2, 24), (7, 24), (1, 30, 24)]:  # 30 rows: beyond the plan
        x = torch.randn(shape)
        assert fast(x).shape == (*shape[:-1], 40)
        torch.testing.assert_close(fast(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_the_weight_is_shared_and_the_copy_follows_in_place_updates():
    layer = torch.nn.Linear(8, 6, bias=False)
    fast = DecodeLinear(layer, {1: X_WT})
    assert fast.weight is layer.weight
    x = torch.randn(1, 8)
    before = fast(x)
    with torch.no_grad():
        layer.weight.mul_(2.0)  # an optimizer step changes the weight in place
    torch.testing.assert_close(fast(x), 2 * before)


def test_training_through_the_copy_layout_still_reaches_the_weight():
    layer = torch.nn.Linear(8, 6)
    fast = DecodeLinear(layer, {1: X_WT, 2: W_XT})
    for rows in (1, 2):
        layer.zero_grad()
        fast(torch.randn(rows, 8)).sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_install_keeps_ties_keys_and_greedy_output(tok_dir):
    model = four_layer_model(tok_dir)
    keys = set(model.state_dict())
    prompt = random_prompt(3)
    reference = greedy_tokens(model, prompt, 12)
    count = install(model, {n: W_XT for n in range(1, 10)})
    assert count == sum(isinstance(m, DecodeLinear) for m in model.modules()) > 4
    assert set(model.state_dict()) == keys
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert greedy_tokens(model, prompt, 12) == reference
    install(model, {1: X_WT})  # installing again updates the plan in place
    assert all(m.plan == {1: X_WT} for m in model.modules() if isinstance(m, DecodeLinear))
    assert greedy_tokens(model, prompt, 12) == reference


def test_choose_layouts_needs_a_clear_win_to_leave_f_linear():
    times = {1: {LINEAR: 1.0, W_XT: 0.99, X_WT: 0.8}, 2: {LINEAR: 1.0, W_XT: 0.985, X_WT: 1.2},
             3: {LINEAR: 1.0, W_XT: 0.5, X_WT: 0.6}}
    assert choose_layouts(times) == {1: X_WT, 2: LINEAR, 3: W_XT}
    with pytest.raises(ValueError, match="baseline"):
        choose_layouts({1: {W_XT: 0.5}})


@pytest.mark.parametrize("plan, match", [({0: LINEAR}, "covers 1..16"), ({17: LINEAR}, "covers"),
                                         ({1: "fast"}, "not one of")])
def test_a_bad_plan_is_refused_by_name(plan, match):
    with pytest.raises(ValueError, match=match):
        check_plan(plan)
    with pytest.raises(ValueError, match=match):
        install(torch.nn.Sequential(torch.nn.Linear(2, 2)), plan)


def test_tuning_times_every_layout_and_installs_the_choice(tok_dir):
    model = four_layer_model(tok_dir)
    prompt = random_prompt(5, n=20)
    reference = greedy_tokens(model, prompt, 8)
    plan, times = tune_decode_plan(model, prompt, rows=4, reps=1)
    assert set(plan) == set(times) == {1, 2, 3, 4}
    assert all(set(t) == set(LAYOUTS) and min(t.values()) > 0 for t in times.values())
    assert all(m.plan == plan for m in model.modules() if isinstance(m, DecodeLinear))
    assert greedy_tokens(model, prompt, 8) == reference
    report = decode_layout("auto", model, None, prompt, "cpu")
    assert set(report["plan"]) == {str(n) for n in range(1, MAX_VERIFY + 1)} and report["one_token_gain"] > 0
    assert decode_layout("linear", model, None, prompt, "cpu")["plan"] is None
    assert "too short" in decode_layout("auto", model, None, prompt[:5], "cpu")["note"]
    with pytest.raises(ValueError, match="not one of"):
        decode_layout("fastest", model, None, prompt, "cpu")
