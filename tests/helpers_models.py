"""A tiny private model for the early-exit and drafting tests: four layers, so an exit after one or
two is a real prefix of it (built from a config, never downloaded), and the greedy helpers around it."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig

from fednode.learning.models import PRESETS, ModelPreset, build_model
from fednode.learning.tokenizer import build_tokenizer

FOUR = ModelPreset(name="four", hidden_size=32, intermediate_size=64, num_layers=4, num_heads=2,
                   vocab_size=PRESETS["micro"].vocab_size, max_positions=128)


def four_layer_model(tokenizer_dir: Path):
    tok = build_tokenizer(tokenizer_dir, vocab_size=FOUR.vocab_size)
    return build_model(FOUR, tok, seed=0).eval()


def sharp_four_layer_model(tokenizer_dir: Path, sharp: float = 12.0, loud: float = 20.0):
    """`four_layer_model` with sharp, loud attention: varied greedy output, and its next token depends on
    which past positions are cached, so a cache cropped one token wrong changes the output (with
    near-uniform attention it may not)."""
    model = four_layer_model(tokenizer_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharp)
            layer.self_attn.k_proj.weight.mul_(sharp)
            layer.self_attn.o_proj.weight.mul_(loud)
    return model


def forced_config(model, new: int) -> GenerationConfig:
    """Greedy, exactly `new` tokens (EOS masked), as the throughput benchmark generates."""
    eos = model.config.eos_token_id
    return GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=eos,
                            pad_token_id=eos)


def random_prompt(seed: int, n: int = 11) -> list[int]:
    return torch.randint(5, FOUR.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy_tokens(model, prompt: list[int], new: int) -> list[int]:
    """transformers' own greedy output after `prompt`: what every drafted loop must reproduce."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=forced_config(model, new))
    return out[0, len(prompt):].tolist()
