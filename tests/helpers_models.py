"""A tiny private model for the early-exit tests: four layers, so an exit after one or two is a
real prefix of it (built from a config, never downloaded)."""

from __future__ import annotations

from pathlib import Path

from fednode.learning.models import PRESETS, ModelPreset, build_model
from fednode.learning.tokenizer import build_tokenizer

FOUR = ModelPreset(name="four", hidden_size=32, intermediate_size=64, num_layers=4, num_heads=2,
                   vocab_size=PRESETS["micro"].vocab_size, max_positions=128)


def four_layer_model(tokenizer_dir: Path):
    tok = build_tokenizer(tokenizer_dir, vocab_size=FOUR.vocab_size)
    return build_model(FOUR, tok, seed=0).eval()
