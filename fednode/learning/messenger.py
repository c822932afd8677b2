"""The nested knowledge-messenger capacity ladder: one Llama family, levels that are prefixes.

A messenger family fixes the hidden size, head size and vocabulary (the site's tokenizer) and
orders levels 0..L. Level l keeps the first k_l decoder layers (depth prefix), the first m_l
FFN units and the first h_l attention heads (width prefix). Every tensor of level l is then a
leading-prefix slice of the same tensor at any higher level, so `aggregate.fedavg` averages
each coordinate over the peers that hold it, whatever their level.

Attention is plain multi-head (num_key_value_heads = num_heads at every level): k/v grow with
q head by head, so a head prefix is a row prefix of q, k and v alike and GQA's head-to-group
mapping never has to be preserved. head_dim is fixed, so rotary embeddings, the attention
scale and every RMSNorm are the same at every level.

Growth is function-preserving (papers.md A9, 4.3): new FFN units and heads get zero output
columns, new layers zero output projections and unit norms (identity on the residual stream),
and all random coordinates are drawn from generators keyed by (seed, tensor name) over the
top-level shape, so every peer grows bit-identically and growing l -> m -> n equals l -> n.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fednode.errors import ConfigError
from fednode.learning.models import ARCHITECTURE, SEEDED_INIT, load_state_tensors, state_tensors
from fednode.learning.trainer import causal_lm_loss

MESSENGER_ARCHITECTURE = f"{ARCHITECTURE}+nested-ladder/mha/growth-v1"  # bump on init/growth changes
INIT_STD = 0.02  # LlamaConfig.initializer_range default: the standard init of a fresh model
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_ZERO_ON_GROWTH = ("self_attn.o_proj.weight", "mlp.down_proj.weight")  # output projections
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LevelSpec:
    """One rung: how many layers, FFN units and heads the messenger keeps, and (width ladders)
    how many hidden channels: 0 means the ladder's full hidden_size."""

    num_layers: int
    intermediate_size: int
    num_heads: int
    hidden_size: int = 0


_LEVEL_FIELDS = ("num_layers", "intermediate_size", "num_heads")


def level_hidden(ladder: Ladder, spec: LevelSpec) -> int:
    """Hidden channels of a level (a prefix of the ladder's hidden_size)."""
    return spec.hidden_size or ladder.hidden_size


@dataclass(frozen=True)
class Ladder:
    """A messenger family: fixed hidden/head/vocab sizes and nested levels (validated)."""

    hidden_size: int
    head_dim: int
    vocab_size: int
    max_positions: int
    levels: tuple[LevelSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        for name in ("hidden_size", "head_dim", "vocab_size", "max_positions"):
            _require_positive(name, getattr(self, name))
        if not self.levels:
            raise ValueError("ladder has no levels: give at least one LevelSpec")
        for i, spec in enumerate(self.levels):
            _check_level(self, i, spec)

    @property
    def top(self) -> int:
        """Index of the largest level."""
        return len(self.levels) - 1


def _require_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} is {value!r}: it must be a positive int")


def _check_level(ladder: Ladder, i: int, spec: LevelSpec) -> None:
    """Positive fields, heads dividing hidden, and non-decreasing against the level below."""
    for field in _LEVEL_FIELDS:
        _require_positive(f"levels[{i}].{field}", getattr(spec, field))
    hid = level_hidden(ladder, spec)
    if not 0 < hid <= ladder.hidden_size:
        raise ValueError(f"levels[{i}].hidden_size {spec.hidden_size} must be within 1..{ladder.hidden_size}")
    if hid % spec.num_heads:
        # transformers' LlamaConfig refuses this even with an explicit head_dim
        raise ValueError(
            f"levels[{i}].num_heads {spec.num_heads} does not divide hidden_size {hid}: transformers requires it"
        )
    if i == 0:
        return
    prev = ladder.levels[i - 1]
    if hid < level_hidden(ladder, prev):
        raise ValueError(f"levels[{i}] is narrower than levels[{i - 1}]: each level must be a prefix of the next")
    for field in _LEVEL_FIELDS:
        if getattr(spec, field) < getattr(prev, field):
            raise ValueError(
                f"levels[{i}].{field} {getattr(spec, field)} < levels[{i - 1}].{field} {getattr(prev, field)}: "
                "each level must be a prefix of the next (non-decreasing in every field)"
            )
    if spec == prev:
        raise ValueError(f"levels[{i}] equals levels[{i - 1}]: each level must grow at least one field")


def _ladder(hidden: int, head_dim: int, *levels: tuple[int, ...]) -> Ladder:
    return Ladder(hidden, head_dim, 4096, 512, tuple(LevelSpec(*spec) for spec in levels))


LADDERS: dict[str, Ladder] = {
    # for the "micro" preset (hidden 32): fast tests; alternates width and depth growth
    "micro": _ladder(32, 8, (1, 16, 1), (1, 32, 2), (2, 32, 2), (2, 64, 4)),
    # for the "tiny" preset (hidden 96): ~0.49M .. 0.84M params; the top level equals tiny's shape
    "tiny": _ladder(96, 24, (2, 96, 2), (3, 128, 2), (3, 192, 3), (4, 256, 4)),
    # for "tiny" with capacity that scales: hidden width nested too (the embedding is most of a
    # small model), 69k / 157k / 403k / 835k params (each level >= 2x the one below; the top is
    # as large as tiny itself)
    "tiny-wide": _ladder(96, 16, (1, 48, 1, 16), (2, 96, 2, 32), (3, 160, 4, 64), (4, 256, 6, 96)),
}


def ladder_hash(ladder: Ladder) -> str:
    """sha256 of the family description: peers with equal hashes can average and grow together."""
    desc = dataclasses.asdict(ladder)
    desc["architecture"] = MESSENGER_ARCHITECTURE
    desc["init_std"] = INIT_STD
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def _spec(ladder: Ladder, level: int) -> LevelSpec:
    if not isinstance(level, int) or not 0 <= level <= ladder.top:
        raise ValueError(f"level {level!r} is outside the ladder: use 0..{ladder.top}")
    return ladder.levels[level]


def level_shapes(ladder: Ladder, level: int) -> dict[str, Shape]:
    """Name -> shape of every trainable tensor at a level (the `state_tensors` layout)."""
    spec = _spec(ladder, level)
    hid, attn, ffn = level_hidden(ladder, spec), spec.num_heads * ladder.head_dim, spec.intermediate_size
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (ladder.vocab_size, hid)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (attn, hid),
                p + "self_attn.k_proj.weight": (attn, hid),
                p + "self_attn.v_proj.weight": (attn, hid),
                p + "self_attn.o_proj.weight": (hid, attn),
                p + "mlp.gate_proj.weight": (ffn, hid),
                p + "mlp.up_proj.weight": (ffn, hid),
                p + "mlp.down_proj.weight": (hid, ffn),
                p + "input_layernorm.weight": (hid,),
                p + "post_attention_layernorm.weight": (hid,),
            }
        )
    shapes["model.norm.weight"] = (hid,)
    return shapes


def level_param_count(ladder: Ladder, level: int) -> int:
    """Unique trainable parameters at a level (tied lm_head counted once)."""
    return sum(_numel(shape) for shape in level_shapes(ladder, level).values())


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _prefix(shape: Shape) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


def messenger_config(ladder: Ladder, level: int, tokenizer=None) -> LlamaConfig:
    """LlamaConfig of a level; special-token ids come from the tokenizer when one is given."""
    spec = _spec(ladder, level)
    if tokenizer is not None and len(tokenizer) > ladder.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but the messenger ladder has vocab_size "
            f"{ladder.vocab_size}: use the ladder matching the site's tokenizer"
        )
    ids: dict[str, Any] = {key: getattr(tokenizer, key, None) for key in _TOKEN_IDS}
    return LlamaConfig(
        vocab_size=ladder.vocab_size,
        hidden_size=level_hidden(ladder, spec),
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=ladder.head_dim,
        max_position_embeddings=ladder.max_positions,
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        **ids,
    )


def model_level(ladder: Ladder, model) -> int:
    """The ladder level a messenger model is at (ValueError when its shape is not a level)."""
    cfg = model.config
    fixed = (getattr(cfg, "head_dim", None), cfg.vocab_size)
    if fixed == (ladder.head_dim, ladder.vocab_size):
        here = (cfg.num_hidden_layers, cfg.intermediate_size, cfg.num_attention_heads, cfg.hidden_size)
        for level, spec in enumerate(ladder.levels):
            there = (spec.num_layers, spec.intermediate_size, spec.num_heads, level_hidden(ladder, spec))
            if here == there and cfg.num_key_value_heads == spec.num_heads:
                return level
    raise ValueError("model is not a level of this messenger ladder: build it with build_messenger")


def _generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator keyed by (seed, tensor name): independent of level, order and peer."""
    digest = hashlib.sha256(f"{MESSENGER_ARCHITECTURE}\0{int(seed)}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & ((1 << 63) - 1))


def _draw(ladder: Ladder, name: str, seed: int, shape: Shape) -> torch.Tensor:
    """Normal(0, INIT_STD) values of `name` drawn over the top-level shape, cut to `shape`.

    Drawing the full top-level tensor makes each coordinate's value depend only on
    (seed, name, coordinate), so a level's draw is a prefix of every higher level's draw.
    """
    top = level_shapes(ladder, ladder.top)[name]
    full = torch.randn(top, generator=_generator(seed, name), dtype=torch.float32) * INIT_STD
    return full[_prefix(shape)].clone()


def _is_norm(name: str) -> bool:
    return name.endswith(_NORMS)


def init_state(ladder: Ladder, level: int, seed: int) -> dict[str, torch.Tensor]:
    """The standard Llama init of a level from a seed; a level's init is a prefix of the top's."""
    out = {}
    for name, shape in level_shapes(ladder, level).items():
        out[name] = torch.ones(shape) if _is_norm(name) else _draw(ladder, name, seed, shape)
    return out


def _new_model(config: LlamaConfig) -> LlamaForCausalLM:
    """A model skeleton (its own random init is overwritten by the caller)."""
    with SEEDED_INIT, torch.random.fork_rng(devices=[]):  # leave the global RNG to its owner
        torch.manual_seed(0)
        return LlamaForCausalLM(config).float()


def build_messenger(ladder: Ladder, level: int, tokenizer, seed: int) -> LlamaForCausalLM:
    """A fresh messenger at a level; equal seeds give bit-identical weights on every peer."""
    model = _new_model(messenger_config(ladder, level, tokenizer))
    load_state_tensors(model, init_state(ladder, level, seed))
    return model


def _check_names(tensors: Mapping[str, torch.Tensor], ladder: Ladder) -> None:
    known = level_shapes(ladder, ladder.top)
    unknown = sorted(set(tensors) - set(known))
    if unknown:
        raise ValueError(f"tensor {unknown[0]!r} is not part of this messenger family")


def slice_state(tensors: Mapping[str, torch.Tensor], ladder: Ladder, level: int) -> dict[str, torch.Tensor]:
    """The level-l prefix of a state at level >= l (deeper layers dropped, blocks cut); copies."""
    _check_names(tensors, ladder)
    out = {}
    for name, shape in level_shapes(ladder, level).items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(f"missing tensor {name!r}: the state is below level {level}")
        if tensor.ndim != len(shape) or any(t < s for t, s in zip(tensor.shape, shape, strict=True)):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, smaller than level {level}'s {shape}")
        out[name] = tensor[_prefix(shape)].clone()
    return out


def _check_exact(tensors: Mapping[str, torch.Tensor], ladder: Ladder, level: int) -> None:
    """The state must be exactly level `level` (every tensor present with its shape)."""
    _check_names(tensors, ladder)
    shapes = level_shapes(ladder, level)
    extra = sorted(set(tensors) - set(shapes))
    if extra:
        raise ValueError(f"tensor {extra[0]!r} is above level {level}: slice_state the state first")
    for name, shape in shapes.items():
        if name not in tensors:
            raise ValueError(f"missing tensor {name!r}: the state is not at level {level}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, level {level} has {shape}")


def _grown_fill(ladder: Ladder, name: str, seed: int, shape: Shape) -> torch.Tensor:
    """Values of coordinates that growth creates: zero outputs, unit norms, random inputs."""
    if _is_norm(name):
        return torch.ones(shape)
    if name.endswith(_ZERO_ON_GROWTH):
        return torch.zeros(shape)
    return _draw(ladder, name, seed, shape)


def grow_state(
    tensors: Mapping[str, torch.Tensor], ladder: Ladder, from_level: int, to_level: int, growth_seed: int
) -> dict[str, torch.Tensor]:
    """Function-preserving growth of a level state: old values in the prefix, new ones filled.

    New FFN units and heads get random input rows and zero output columns; new layers get
    random inputs, zero o_proj/down_proj and unit norms, so the grown model computes the same
    function. Pure: the input is not modified and the output shares no storage with it.
    """
    if to_level < from_level:
        raise ValueError(f"cannot grow from level {from_level} down to {to_level}: use slice_state")
    _check_exact(tensors, ladder, from_level)
    h_old, h_new = (level_hidden(ladder, _spec(ladder, lv)) for lv in (from_level, to_level))
    # RMSNorm divides by the root mean square over the hidden channels: new channels start at
    # zero, so the mean over h_new channels is h_old/h_new of the old one; norm weights scaled by
    # sqrt(h_old/h_new) keep every normalised value (exact up to RMSNorm's eps)
    # sqrt(h_old/h_new) keep every normalised value (exact up to RMSNorm's eps). New norm
    # coordinates get sqrt(h_0/h_new) (h_0: level 0's width), so growing 0 -> 1 -> 3 equals 0 -> 3.
    norm_scale = (h_old / h_new) ** 0.5
    new_norm = (level_hidden(ladder, _spec(ladder, 0)) / h_new) ** 0.5
    out = {}
    for name, shape in level_shapes(ladder, to_level).items():
        old = tensors.get(name)
        dtype = old.dtype if old is not None else tensors["model.embed_tokens.weight"].dtype
        grown = _grown_fill(ladder, name, growth_seed, shape).to(dtype)
        if _is_norm(name):
            grown.mul_(new_norm)
        if name == "model.embed_tokens.weight" and h_new > h_old:
            grown.zero_()  # new channels of the residual stream start silent (tied head: logits unchanged)
        if old is not None:
            scale = norm_scale if _is_norm(name) else 1.0
            grown[_prefix(tuple(old.shape))] = old.detach().to("cpu", dtype) * scale
        out[name] = grown
    return out


def _role(name: str) -> str:
    """A parameter's role regardless of layer index (for choosing new params' param group)."""
    return _LAYER.sub("model.layers.*.", name)


def _group_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    return {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}


def _pad_state(state: Mapping[str, Any], old: torch.Tensor, new: torch.Tensor) -> dict[str, Any]:
    """Per-parameter optimizer state moved to the new shape: moments zero-padded, step copied."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.shape == old.shape and value.ndim > 0:
            padded = value.new_zeros(new.shape)
            padded[_prefix(tuple(old.shape))] = value
            out[key] = padded
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _fresh_state(template: Mapping[str, Any], new: torch.Tensor) -> dict[str, Any]:
    """State of a param that did not exist: zero moments, the continued step of `template`."""
    out: dict[str, Any] = {}
    for key, value in template.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            out[key] = torch.zeros(new.shape, dtype=value.dtype, device=new.device)
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def _latest_state(optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """The per-param state with the largest step (the template for new params), if any."""
    states = [s for s in optimizer.state.values() if s]
    if not states:
        return None
    return max(states, key=lambda s: float(s.get("step", 0)))


def grow_optimizer(
    optimizer: torch.optim.Optimizer,
    old_params: Mapping[str, torch.Tensor],
    new_params: Mapping[str, torch.nn.Parameter],
) -> torch.optim.Optimizer:
    """A new optimizer of the same class over `new_params`, continuing `optimizer`'s state.

    Param groups keep their hyperparameters (lr, initial_lr, betas, weight decay, ...); a new
    param joins the group of the old param with the same name, else of the same role in another
    layer. Moment tensors (any state tensor shaped like its param: exp_avg, exp_avg_sq,
    max_exp_avg_sq) are zero-padded; new params get zero moments; `step` continues everywhere,
    so bias correction does not restart. Note: zero moments with a continued step make Adam's
    first updates of new coordinates up to a few times lr per coordinate (no bias-correction
    boost to the denominator). An LR scheduler must be re-created on the new optimizer and
    given the old scheduler's state_dict. The old optimizer is left unchanged.
    """
    groups_of = _group_index(optimizer)
    by_role: dict[str, int] = {}
    for name, param in old_params.items():
        if id(param) not in groups_of:
            raise ValueError(f"parameter {name!r} is not managed by the optimizer")
        by_role.setdefault(_role(name), groups_of[id(param)])
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in optimizer.param_groups]
    for name, param in new_params.items():
        old = old_params.get(name)
        index = groups_of[id(old)] if old is not None else by_role.get(_role(name), 0)
        groups[index]["params"].append(param)
    grown = type(optimizer)(groups)  # type: ignore[call-arg]  # every concrete optimizer has defaults
    grown.defaults = dict(optimizer.defaults)
    template = _latest_state(optimizer)
    for name, param in new_params.items():
        old = old_params.get(name)
        if old is not None and optimizer.state.get(old):
            grown.state[param] = _pad_state(optimizer.state[old], old, param)
        elif template is not None:
            grown.state[param] = _fresh_state(template, param)
    return grown


def grow_model(model, ladder: Ladder, to_level: int, growth_seed: int, tokenizer=None) -> LlamaForCausalLM:
    """A new messenger at `to_level` computing the same function as `model` (which is unchanged).

    Without a tokenizer the special-token ids are taken from the old model's config.
    """
    from_level = model_level(ladder, model)
    grown = grow_state(state_tensors(model), ladder, from_level, to_level, growth_seed)
    config = messenger_config(ladder, to_level, tokenizer)
    if tokenizer is None:
        for key in _TOKEN_IDS:
            setattr(config, key, getattr(model.config, key, None))
    new = _new_model(config)
    load_state_tensors(new, grown)
    first = next(model.parameters())
    new.to(device=first.device, dtype=first.dtype)  # type: ignore[call-arg]  # transformers' wrapped .to
    new.train(model.training)
    return new


def grow_model_and_optimizer(
    model, optimizer: torch.optim.Optimizer, ladder: Ladder, to_level: int, growth_seed: int, tokenizer=None
) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    """Grow a messenger and its optimizer together (what a trainer calls at a committed growth)."""
    new_model = grow_model(model, ladder, to_level, growth_seed, tokenizer)
    new_optimizer = grow_optimizer(optimizer, dict(model.named_parameters()), dict(new_model.named_parameters()))
    return new_model, new_optimizer


def estimate_step_bytes(ladder: Ladder, level: int, batch: int, seq: int) -> int:
    """Analytic fp32 memory of one AdamW training step (weights, grads, moments, activations).

    An estimate, not a measurement: CPU torch has no peak-allocation counters, and process RSS
    is blurred by the allocator's caching and other threads. Activations count what autograd
    keeps per token and layer (norm inputs/outputs, q/k/v before and after rotary, attention
    probabilities over `seq` keys, the FFN's four m-wide tensors) plus the logits three times
    (logits, the loss's float copy, the softmax gradient), which dominate small models.
    """
    spec = _spec(ladder, level)
    hid, attn, ffn = level_hidden(ladder, spec), spec.num_heads * ladder.head_dim, spec.intermediate_size
    per_token_layer = 6 * hid + 7 * attn + 4 * ffn + spec.num_heads * seq
    per_token = spec.num_layers * per_token_layer + 2 * hid + 3 * ladder.vocab_size
    floats = 4 * level_param_count(ladder, level) + batch * seq * per_token
    return 4 * floats


def probe_step_cost(
    ladder: Ladder, level: int, tokenizer, batch: int, seq: int, *, repeats: int = 2, seed: int = 0
) -> tuple[float, int]:
    """(seconds, bytes) of one training step at a level, for a node's capacity ceiling.

    Seconds: the fastest of `repeats` timed AdamW steps after one warm-up step, on random
    tokens, with the caller's thread count. Bytes: `estimate_step_bytes` (analytic).
    """
    model = build_messenger(ladder, level, tokenizer, seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    high = len(tokenizer) if tokenizer is not None else ladder.vocab_size
    ids = torch.randint(0, high, (batch, seq), generator=torch.Generator().manual_seed(seed))
    best = float("inf")
    for i in range(repeats + 1):
        start = time.perf_counter()
        loss = causal_lm_loss(model(input_ids=ids, use_cache=False).logits, ids)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i > 0:  # the first step pays for allocation and state creation
            best = min(best, time.perf_counter() - start)
    return best, estimate_step_bytes(ladder, level, batch, seq)
