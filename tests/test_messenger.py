"""The nested messenger ladder: prefixes, function-preserving growth, optimizer growth, nesting."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fednode.errors import ConfigError
from fednode.learning.aggregate import fedavg
from fednode.learning.messenger import (
    LADDERS,
    Ladder,
    LevelSpec,
    build_messenger,
    estimate_step_bytes,
    grow_model,
    grow_model_and_optimizer,
    grow_state,
    init_state,
    ladder_hash,
    level_param_count,
    level_shapes,
    model_level,
    probe_step_cost,
    slice_state,
)
from fednode.learning.models import build_model, count_parameters, load_state_tensors, state_tensors
from fednode.learning.tokenizer import build_tokenizer
from fednode.learning.trainer import causal_lm_loss

MICRO = LADDERS["micro"]
TOP = MICRO.top
ATOL = 1e-5


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def probe() -> torch.Tensor:
    return torch.randint(0, MICRO.vocab_size, (2, 24), generator=torch.Generator().manual_seed(11))


def _trained(level: int, probe: torch.Tensor, steps: int = 3, seed: int = 5):
    """A messenger moved away from its init (so growth is checked on a non-trivial function)."""
    model = build_messenger(MICRO, level, None, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    for _ in range(steps):
        loss = causal_lm_loss(model(input_ids=probe, use_cache=False).logits, probe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model, opt


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _pairs():
    return [(lo, hi) for lo in range(TOP + 1) for hi in range(lo, TOP + 1)]


# --- ladders --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LADDERS))
def test_param_counts_and_shapes_match_built_models(name):
    ladder = LADDERS[name]
    counts = [level_param_count(ladder, lvl) for lvl in range(ladder.top + 1)]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    for lvl in range(ladder.top + 1):
        model = build_messenger(ladder, lvl, None, 0)
        assert count_parameters(model) == counts[lvl]
        assert {k: tuple(v.shape) for k, v in state_tensors(model).items()} == level_shapes(ladder, lvl)
        assert model_level(ladder, model) == lvl
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", ["micro", "tiny"])
def test_top_level_fits_the_private_preset(tok, name):
    ladder = LADDERS[name]
    private = build_model(name, tok, 0)
    assert private.config.hidden_size == ladder.hidden_size
    assert level_param_count(ladder, ladder.top) <= count_parameters(private)


def test_tiny_level_zero_is_small():
    assert 300_000 <= level_param_count(LADDERS["tiny"], 0) <= 500_000


def test_build_with_tokenizer_takes_its_ids_and_refuses_a_bigger_vocab(tok):
    model = build_messenger(MICRO, 1, tok, 0)
    assert model.config.pad_token_id == tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    small = dataclasses.replace(MICRO, vocab_size=len(tok) - 1)
    with pytest.raises(ConfigError, match="vocab_size"):
        build_messenger(small, 0, tok, 0)


def test_build_is_deterministic_and_levels_are_prefixes_of_the_top_init():
    a = state_tensors(build_messenger(MICRO, 2, None, 9))
    assert _equal(a, state_tensors(build_messenger(MICRO, 2, None, 9)))
    assert not _equal(a, state_tensors(build_messenger(MICRO, 2, None, 10)))
    top = init_state(MICRO, TOP, 9)
    for lvl in range(TOP + 1):
        assert _equal(slice_state(top, MICRO, lvl), init_state(MICRO, lvl, 9))


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_messenger(MICRO, 0, None, 1)
    assert torch.equal(torch.rand(3), expected)


def _levels(*specs) -> tuple[LevelSpec, ...]:
    return tuple(LevelSpec(*s) for s in specs)


@pytest.mark.parametrize(
    ("levels", "field"),
    [
        (_levels((2, 16, 2), (1, 32, 2)), "num_layers"),
        (_levels((1, 32, 2), (2, 16, 2)), "intermediate_size"),
        (_levels((1, 16, 4), (2, 32, 2)), "num_heads"),
    ],
)
def test_non_monotone_ladder_is_rejected_naming_the_field(levels, field):
    with pytest.raises(ValueError, match=rf"levels\[1\]\.{field}"):
        Ladder(32, 8, 4096, 512, levels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"levels": ()}, "no levels"),
        ({"levels": _levels((1, 16, 2), (1, 16, 2))}, "equals"),
        ({"levels": _levels((1, 16, 3))}, "num_heads"),  # 3 does not divide 32
        ({"levels": _levels((0, 16, 2))}, "num_layers"),
        ({"hidden_size": 0}, "hidden_size"),
    ],
)
def test_invalid_ladder_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(MICRO, **kwargs)


def test_ladder_hash_is_stable_and_covers_the_description():
    h = ladder_hash(MICRO)
    assert len(h) == 64 and h == ladder_hash(dataclasses.replace(MICRO))
    assert ladder_hash(dataclasses.replace(MICRO, vocab_size=8192)) != h
    assert ladder_hash(dataclasses.replace(MICRO, levels=MICRO.levels[:-1])) != h
    assert ladder_hash(LADDERS["tiny"]) != h


def test_unknown_level_is_rejected():
    with pytest.raises(ValueError, match="outside the ladder"):
        level_shapes(MICRO, TOP + 1)


# --- slicing and growth ---------------------------------------------------------------------


def test_slice_and_grow_are_inverse_on_the_prefix():
    x = init_state(MICRO, TOP, 3)
    for lo, hi in _pairs():
        s = slice_state(x, MICRO, lo)
        grown = grow_state(s, MICRO, lo, hi, growth_seed=17)
        assert {k: tuple(v.shape) for k, v in grown.items()} == level_shapes(MICRO, hi)
        assert _equal(slice_state(grown, MICRO, lo), s)


def test_slice_is_pure():
    x = init_state(MICRO, TOP, 3)
    before = {k: v.clone() for k, v in x.items()}
    s = slice_state(x, MICRO, 0)
    for v in s.values():
        v.add_(1.0)
    assert _equal(x, before)


def test_slice_and_grow_reject_wrong_states():
    low = init_state(MICRO, 0, 1)
    with pytest.raises(ValueError, match="smaller than level"):
        slice_state(low, MICRO, TOP)
    shallow = {k: v for k, v in init_state(MICRO, TOP, 1).items() if not k.startswith("model.layers.1.")}
    with pytest.raises(ValueError, match="below level"):
        slice_state(shallow, MICRO, TOP)
    with pytest.raises(ValueError, match="not part of this messenger family"):
        slice_state({**low, "model.layers.9.mlp.up_proj.weight": torch.zeros(1)}, MICRO, 0)
    with pytest.raises(ValueError, match="use slice_state"):
        grow_state(init_state(MICRO, 2, 1), MICRO, 2, 1, 0)
    with pytest.raises(ValueError, match="above level 0"):
        grow_state(init_state(MICRO, 2, 1), MICRO, 0, 2, 0)
    with pytest.raises(ValueError, match="shape"):
        grow_state(init_state(MICRO, 1, 1), MICRO, 0, 2, 0)


def test_grow_fills_new_coordinates_function_preservingly():
    old = init_state(MICRO, 0, 2)
    grown = grow_state(old, MICRO, 0, TOP, growth_seed=4)
    m0, m3 = MICRO.levels[0].intermediate_size, MICRO.levels[TOP].intermediate_size
    a0 = MICRO.levels[0].num_heads * MICRO.head_dim
    layer0, new_layer = "model.layers.0.", f"model.layers.{MICRO.levels[TOP].num_layers - 1}."
    assert torch.count_nonzero(grown[layer0 + "mlp.down_proj.weight"][:, m0:]) == 0
    assert torch.count_nonzero(grown[layer0 + "mlp.gate_proj.weight"][m0:m3]) > 0
    assert torch.count_nonzero(grown[layer0 + "self_attn.o_proj.weight"][:, a0:]) == 0
    assert torch.count_nonzero(grown[layer0 + "self_attn.q_proj.weight"][a0:]) > 0
    assert torch.count_nonzero(grown[new_layer + "self_attn.o_proj.weight"]) == 0
    assert torch.count_nonzero(grown[new_layer + "mlp.down_proj.weight"]) == 0
    assert torch.equal(grown[new_layer + "input_layernorm.weight"], torch.ones(MICRO.hidden_size))
    assert torch.count_nonzero(grown[new_layer + "self_attn.k_proj.weight"]) > 0


def test_growth_is_bit_identical_across_peers_and_seeded():
    old = init_state(MICRO, 0, 2)
    a = grow_state(old, MICRO, 0, TOP, growth_seed=4)
    assert _equal(a, grow_state({k: v.clone() for k, v in old.items()}, MICRO, 0, TOP, growth_seed=4))
    b = grow_state(old, MICRO, 0, TOP, growth_seed=5)
    assert _equal(slice_state(a, MICRO, 0), slice_state(b, MICRO, 0))  # old coordinates identical
    m0 = MICRO.levels[0].intermediate_size
    gate = "model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(a[gate][m0:], b[gate][m0:])  # new random coordinates differ
    down = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[down], b[down])  # new output columns are zero under any seed


def test_growth_in_steps_equals_growth_in_one_go():
    old = init_state(MICRO, 0, 2)
    direct = grow_state(old, MICRO, 0, TOP, growth_seed=8)
    stepped = old
    for lvl in range(TOP):
        stepped = grow_state(stepped, MICRO, lvl, lvl + 1, growth_seed=8)
    assert _equal(direct, stepped)


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(0, 1), (1, 2), (2, 3), (0, TOP)],
    ids=["width-ffn-heads", "depth", "width-ffn-heads-2", "all"],
)
def test_growth_preserves_logits_and_loss(probe, lo, hi):
    model, _ = _trained(lo, probe)
    before = _logits(model, probe)
    grown = grow_model(model, MICRO, hi, growth_seed=21)
    after = _logits(grown, probe)
    assert model_level(MICRO, grown) == hi
    assert torch.allclose(before, after, atol=ATOL, rtol=0)
    assert abs(float(causal_lm_loss(before, probe)) - float(causal_lm_loss(after, probe))) < ATOL


def test_function_check_detects_non_preserving_growth(probe):
    """Control: random output columns for the new units do change the function."""
    model, _ = _trained(0, probe)
    bad = grow_state(state_tensors(model), MICRO, 0, 1, growth_seed=21)
    m0 = MICRO.levels[0].intermediate_size
    bad["model.layers.0.mlp.down_proj.weight"][:, m0:] = torch.randn(MICRO.hidden_size, 16) * 0.5
    wide = build_messenger(MICRO, 1, None, 0)
    load_state_tensors(wide, bad)
    assert not torch.allclose(_logits(model, probe), _logits(wide, probe), atol=ATOL, rtol=0)


# --- optimizer growth -----------------------------------------------------------------------


def test_optimizer_growth_pads_moments_and_continues_step(probe):
    model, opt = _trained(1, probe, steps=3)
    old_params = dict(model.named_parameters())
    old_state = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in old_params.items()}
    new_model, new_opt = grow_model_and_optimizer(model, opt, MICRO, TOP, growth_seed=3)
    new_params = dict(new_model.named_parameters())
    assert [p for g in new_opt.param_groups for p in g["params"]] == list(new_params.values())
    assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert new_opt.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    for name, param in new_params.items():
        state = new_opt.state[param]
        assert float(state["step"]) == 3.0
        for key in ("exp_avg", "exp_avg_sq"):
            moment = state[key]
            assert moment.shape == param.shape
            if name in old_state:
                old = old_state[name][key]
                region = tuple(slice(0, s) for s in old.shape)
                assert torch.equal(moment[region], old)
                assert float(moment.abs().sum()) == pytest.approx(float(old.abs().sum()))  # rest is zero
            else:
                assert torch.count_nonzero(moment) == 0
    for name, param in old_params.items():  # the old optimizer is untouched
        assert all(torch.equal(opt.state[param][k], v) for k, v in old_state[name].items())


def test_training_step_after_growth_moves_new_coordinates(probe):
    model, opt = _trained(1, probe, steps=2)
    new_model, new_opt = grow_model_and_optimizer(model, opt, MICRO, TOP, growth_seed=3)
    before = state_tensors(new_model)
    new_model.train()
    loss = causal_lm_loss(new_model(input_ids=probe, use_cache=False).logits, probe)
    assert torch.isfinite(loss)
    new_opt.zero_grad(set_to_none=True)
    loss.backward()
    new_opt.step()
    after = state_tensors(new_model)
    m1, a1 = MICRO.levels[1].intermediate_size, MICRO.levels[1].num_heads * MICRO.head_dim
    down, o_proj = "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    assert torch.count_nonzero(after[down][:, m1:]) > 0  # new FFN output columns left zero
    assert torch.count_nonzero(after[o_proj][:, a1:]) > 0  # new head output columns left zero
    new_layer = f"model.layers.{MICRO.levels[TOP].num_layers - 1}.mlp.down_proj.weight"
    assert torch.count_nonzero(after[new_layer]) > 0  # new layer's output projection learns
    assert float(new_opt.state[dict(new_model.named_parameters())[down]]["step"]) == 3.0
    assert not torch.equal(before[down], after[down])


# --- nested aggregation ---------------------------------------------------------------------


def test_nested_fedavg_averages_shared_coordinates_only():
    low, high = init_state(MICRO, 0, 1), init_state(MICRO, 2, 2)
    merged = fedavg([(high, 1.0), (low, 1.0)])  # the level-2 receiver first
    assert {k: tuple(v.shape) for k, v in merged.items()} == level_shapes(MICRO, 2)
    for name, tensor in merged.items():
        expected = high[name].clone()
        if name in low:
            region = tuple(slice(0, s) for s in low[name].shape)
            expected[region] = (high[name][region] + low[name]) / 2
        assert torch.allclose(tensor, expected, atol=1e-7), name
    deep = "model.layers.1.mlp.up_proj.weight"  # only the level-2 peer holds layer 1
    assert torch.equal(merged[deep], high[deep])


def test_nested_fedavg_for_the_lower_receiver_is_sliced_back():
    low, high = init_state(MICRO, 0, 1), init_state(MICRO, 2, 2)
    merged = slice_state(fedavg([(low, 1.0), (high, 3.0)]), MICRO, 0)
    expected = {k: (low[k] + 3 * v) / 4 for k, v in slice_state(high, MICRO, 0).items()}
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-7) for k in merged)


# --- cost probe -----------------------------------------------------------------------------


def test_step_cost_probe_and_estimate():
    sizes = [estimate_step_bytes(MICRO, lvl, 4, 32) for lvl in range(TOP + 1)]
    assert sizes == sorted(sizes)
    assert sizes[0] >= 16 * level_param_count(MICRO, 0)
    seconds, size = probe_step_cost(MICRO, 0, None, batch=2, seq=16, repeats=1)
    assert 0 < seconds < 10
    assert size == estimate_step_bytes(MICRO, 0, 2, 16)
