"""Model presets built from configs (never downloaded) and their plain-tensor state.

Peers exchange plain `{name: tensor}` dicts, so this module owns the mapping between a
transformers model and that dict, and the architecture hash that peers compare at handshake.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fednode.errors import ConfigError

ARCHITECTURE = "llama-causal-lm/tied-embeddings/v1"  # part of family_hash; bump on layout changes


@dataclass(frozen=True)
class ModelPreset:
    """The architecture knobs of a Llama-style causal LM."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int = 4096
    max_positions: int = 512


PRESETS: dict[str, ModelPreset] = {
    p.name: p
    for p in (
        ModelPreset("micro", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2),
        ModelPreset("tiny", hidden_size=96, intermediate_size=256, num_layers=4, num_heads=4),
        ModelPreset("small", hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4),
    )
}


def resolve_preset(preset: str | ModelPreset) -> ModelPreset:
    """A preset object from a name (ConfigError naming the known presets otherwise)."""
    if isinstance(preset, ModelPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise ConfigError(f"unknown model preset {preset!r}: use one of {known}") from None


def family_hash(preset: ModelPreset) -> str:
    """sha256 of the architecture (the name is excluded: equal shapes mean one family)."""
    desc = dataclasses.asdict(preset)
    desc.pop("name")
    desc["architecture"] = ARCHITECTURE
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def model_config(preset: ModelPreset, tokenizer) -> LlamaConfig:
    """The LlamaConfig for a preset, with special-token ids taken from the tokenizer."""
    if preset.hidden_size % preset.num_heads:
        raise ConfigError(
            f"preset {preset.name!r}: hidden_size {preset.hidden_size} is not divisible by "
            f"num_heads {preset.num_heads}: change one of them"
        )
    if len(tokenizer) > preset.vocab_size:
        raise ConfigError(
            f"tokenizer has {len(tokenizer)} tokens but preset {preset.name!r} has vocab_size "
            f"{preset.vocab_size}: build the tokenizer with vocab_size={preset.vocab_size}"
        )
    return LlamaConfig(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=preset.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_model(preset: str | ModelPreset, tokenizer, seed: int) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives bit-identical weights on every peer.

    The global RNG is forked, so building a model does not disturb the caller's randomness.
    """
    config = model_config(resolve_preset(preset), tokenizer)
    with SEEDED_INIT:  # several nodes in one process build at once: one seeded draw at a time
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config)
    return model.float()


# transformers initialises weights from torch's one global generator. Two threads seeding and
# drawing from it at once (nodes of one process starting together: the simulation harness, the
# demo) interleave their draws, and "the same seed" gave each node different weights; FedAvg then
# averaged unrelated models. Every seeded use of the global generator holds this lock.
SEEDED_INIT = threading.Lock()


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def state_tensors(model) -> dict[str, torch.Tensor]:
    """Trainable parameters as detached CPU copies (tied lm_head dropped).

    Copies, not views: the snapshot must not change when training continues.
    """
    out = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        if name == "lm_head.weight" and _tied(model):
            continue
        out[name] = param.detach().to("cpu", copy=True).contiguous()
    return out


def load_state_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the model in place (optimizer references stay valid); strict."""
    params = {
        name: p
        for name, p in model.named_parameters(remove_duplicate=True)
        if not (name == "lm_head.weight" and _tied(model))
    }
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise ValueError(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise ValueError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    for name, param in params.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(
                f"tensor {name!r} has shape {tuple(tensors[name].shape)}, model expects {tuple(param.shape)}"
            )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def count_parameters(model) -> int:
    """Unique trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def load_partial_state(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a subset of the model's tensors in place (the shared prefix); names and shapes must match."""
    params = dict(model.named_parameters(remove_duplicate=True))
    for name, tensor in tensors.items():
        param = params.get(name)
        if param is None:
            raise ValueError(f"unknown tensor {name!r}")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
