"""`fednode export`: a node trained for a real round, exported, reloaded by transformers alone
(no fednode code in the loading path), generating, and scoring on HumanEval exactly as the
convergence benchmark scores the same checkpoint; plus the one-line errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from fednode.cli import main
from fednode.config import load_config, to_toml
from fednode.errors import ExitCode
from fednode.learning.data import stdlib_partitions, write_partition
from fednode.node.learner import build_learner, checkpoint_metadata
from fednode.store.checkpoint import save_checkpoint
from fednode.store.journal import Journal, RoundRecord
from tools.convergence.presets import Arm, Preset
from tools.convergence.run import _score
from tools.humaneval.cli import humaneval
from tools.humaneval.cli import main as humaneval_main
from tools.humaneval.data import load_problems
from tools.humaneval.nll import solution_nll

PROBLEMS = 3


def _node(root: Path, name: str, learning: dict, rounds: int = 1):
    """A real node config on disk, a real learner trained for `rounds` rounds, each committed the
    way the round loop commits (checkpoint, then journal row with its hash)."""
    code = root / "code"
    if not code.exists():
        write_partition(stdlib_partitions(2)[0], code, max_bytes=20_000)
    raw = {"node": {"name": name, "data_dir": str(root / name / "state")},
           "model": {"preset": "micro", "tokenizer_cache": str(root / "tok")},
           "data": {"dir": str(code), "seq_len": 32, "max_tokens": 3_000},
           "train": {"steps_per_round": 2, "batch_size": 2, "threads": 1},
           "learning": {"curriculum": False, "public_steps": 1, **learning}}
    path = root / f"{name}.toml"
    path.write_text(to_toml(raw))
    cfg = load_config(path)
    learner = build_learner(cfg)
    recs = []
    with Journal.open(cfg.node.data_dir / "journal.db") as journal:
        for r in range(1, rounds + 1):
            result = learner.train_round(r)
            learner.merge([], {})
            meta = checkpoint_metadata(cfg, learner, r, 0)  # as the round loop writes it
            file, sha = save_checkpoint(cfg.node.data_dir / "checkpoints", r, learner.checkpoint_state(), meta)
            rec = RoundRecord(round=r, epoch=0, level=learner.level, checkpoint=file, checkpoint_sha256=sha,
                              loss_before=result.loss_before, loss_after=result.loss_after, tokens=result.tokens,
                              bytes_sent=0, bytes_received=0, merged_from=[], source="local",
                              committed_unix_ms=int(time.time() * 1000))
            journal.commit_round(rec)
            recs.append(rec)
    return path, cfg, learner, recs


@pytest.fixture(scope="module")
def static_node(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return (root, *_node(root, "site-a", {"mode": "static", "static_level": 1}, rounds=2))


@pytest.fixture(scope="module")
def fedavg_node(static_node):
    root = static_node[0]
    return _node(root, "site-f", {"mode": "fedavg"})


def export(*args: str):
    return CliRunner().invoke(main, ["export", *args])


def one_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fednode: error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _ids(tok) -> torch.Tensor:
    return torch.tensor([tok("def add(a, b):\n    return a + b\n", add_special_tokens=False)["input_ids"]])


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_export_private_reloads_generates_and_scores_like_the_benchmark(static_node, tmp_path):
    root, path, cfg, learner, recs = static_node
    out = tmp_path / "p"
    result = export("--config", str(path), "--what", "private", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "round 2" in result.stdout and str(out) in result.stdout
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "fednode_export.json").read_text())
    assert info["round"] == 2 and info["what"] == "private" and info["checkpoint_sha256"] == recs[-1].checkpoint_sha256

    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert type(model).__module__.startswith("transformers.")
    assert tok.encode("import os\n") == learner.tokenizer.encode("import os\n")
    ids = _ids(tok)
    learner.private.eval()
    torch.testing.assert_close(_logits(model, ids), _logits(learner.private, ids), rtol=0, atol=1e-5)

    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    expected = learner.private.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(generated, expected)

    problems = load_problems(PROBLEMS)
    preset = Preset(name="export-test", private="micro", ladder="micro", levels=4, score_messenger=True, rounds=2)
    scores = _score(preset, Arm("static", 1), cfg.model.seed, {"site-a": recs}, {"site-a": cfg.node.data_dir},
                    problems, tmp_path / "score", lambda _msg: None)
    reloaded = solution_nll(model, tok, problems).bits_per_byte
    assert math.isfinite(reloaded)
    assert reloaded == pytest.approx(scores[("site-a", 2)]["P"], abs=1e-4)

    out_m = tmp_path / "m"
    result = export("--config", str(path), "--what", "messenger", "--out", str(out_m))
    assert result.exit_code == 0, result.output
    m = AutoModelForCausalLM.from_pretrained(str(out_m), local_files_only=True).eval()
    assert m.config.num_hidden_layers == 1 and m.config.num_attention_heads == 2  # the micro ladder's level 1
    torch.testing.assert_close(_logits(m, ids), _logits(learner.messenger.eval(), ids), rtol=0, atol=1e-5)
    m_tok = AutoTokenizer.from_pretrained(str(out_m), local_files_only=True)
    assert solution_nll(m, m_tok, problems).bits_per_byte == pytest.approx(scores[("site-a", 2)]["M"], abs=1e-4)


def test_export_an_older_round_and_the_bench_reads_the_node_directly(static_node, tmp_path):
    root, path, cfg, learner, recs = static_node
    out = tmp_path / "r1"
    result = export("--config", str(path), "--round", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "fednode_export.json").read_text())["round"] == 1
    runner = CliRunner()
    args = ["nll", "--limit", "2"]
    by_dir = runner.invoke(humaneval, [*args, "--model-dir", str(out)])
    by_node = runner.invoke(humaneval, [*args, "--config", str(path), "--round", "1"])
    assert by_dir.exit_code == 0 and by_node.exit_code == 0, (by_dir.output, by_node.output)
    a, b = json.loads(by_dir.stdout.splitlines()[-1]), json.loads(by_node.stdout.splitlines()[-1])
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], abs=1e-9)
    assert "site-a" in b["model"] and "round 1" in b["model"]
    assert humaneval_main(["nll", "--limit", "1", "--config", str(path), "--what", "merged"]) == 1


def test_fedavg_exports_the_merged_model_and_refuses_a_messenger(fedavg_node, tmp_path):
    path, cfg, learner, _recs = fedavg_node
    out = tmp_path / "f"
    result = export("--config", str(path), "--what", "merged", "--out", str(out))
    assert result.exit_code == 0, result.output
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    ids = _ids(learner.tokenizer)
    torch.testing.assert_close(_logits(model, ids), _logits(learner.model.eval(), ids), rtol=0, atol=1e-5)
    line = one_line(export("--config", str(path), "--what", "messenger", "--out", str(tmp_path / "x")),
                    ExitCode.CONFIG)
    assert "fedavg" in line and "available: private, merged" in line
    assert not (tmp_path / "x").exists()


def test_export_errors_are_one_line(static_node, tmp_path):
    root, path, cfg, _learner, recs = static_node
    line = one_line(export("--config", str(tmp_path / "nope.toml"), "--out", str(tmp_path / "o")), ExitCode.CONFIG)
    assert "nope.toml" in line and "does not exist" in line

    line = one_line(export("--config", str(path), "--round", "7", "--out", str(tmp_path / "o")), ExitCode.STORE)
    assert "round 7" in line and "1, 2" in line

    line = one_line(export("--config", str(path), "--what", "merged", "--out", str(tmp_path / "o")), ExitCode.CONFIG)
    assert "available: private, messenger" in line

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    line = one_line(export("--config", str(path), "--out", str(full)), ExitCode.CONFIG)
    assert "not empty" in line and str(full) in line
    assert [p.name for p in full.iterdir()] == ["keep.txt"]

    fresh = tmp_path / "fresh.toml"  # a node that never ran: no journal
    fresh.write_text(path.read_text().replace(str(cfg.node.data_dir), str(tmp_path / "empty-state")))
    line = one_line(export("--config", str(fresh), "--out", str(tmp_path / "o")), ExitCode.STORE)
    assert "no checkpoint" in line and "journal.db" in line
    assert not (tmp_path / "empty-state").exists()  # looking does not create a data dir


def test_checkpoints_describe_themselves_and_a_config_that_contradicts_them_is_one_line(static_node, tmp_path):
    from fednode.store.checkpoint import load_checkpoint

    root, path, cfg, learner, recs = static_node
    _tensors, meta = load_checkpoint(cfg.node.data_dir / "checkpoints" / recs[-1].checkpoint)
    assert {k: meta[k] for k in ("round", "mode", "level", "preset", "family", "tokenizer_hash")} == {
        "round": "2", "mode": "static", "level": "1", "preset": "micro", "family": "distilled",
        "tokenizer_hash": learner.info.tokenizer_hash}
    assert json.loads(meta["model_config"])["hidden_size"] == learner.private.config.hidden_size
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace('preset = "micro"', 'preset = "tiny"'))
    line = one_line(export("--config", str(other), "--out", str(tmp_path / "o")), ExitCode.CONFIG)
    assert "with preset 'micro'" in line and "'tiny'" in line and "use the config the node trained with" in line


def test_a_corrupt_checkpoint_is_one_line(tmp_path):
    path, cfg, _learner, recs = _node(tmp_path, "site-c", {"mode": "fedavg"})
    ckpt = cfg.node.data_dir / "checkpoints" / recs[0].checkpoint
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    line = one_line(export("--config", str(path), "--out", str(tmp_path / "o")), ExitCode.STORE)
    assert "corrupt" in line and ckpt.name in line
    assert not (tmp_path / "o").exists()
    ckpt.unlink()
    line = one_line(export("--config", str(path), "--out", str(tmp_path / "o")), ExitCode.STORE)
    assert "round 1" in line and "pruned" in line


@pytest.fixture(scope="module")
def lora_node(static_node):
    root = static_node[0]
    return _node(root, "site-l", {"mode": "static", "family": "lora", "static_level": 1, "lora_ranks": [2, 4, 8],
                                  "lora_private_rank": 2}, rounds=2)


def test_lora_exports_p_and_the_mesh_model_as_plain_transformers_models(lora_node, tmp_path):
    """P is the frozen base with both adapters merged in; the mesh's model is the base with the shared
    adapter alone: both load with transformers only (no peft) and compute what the learner does."""
    path, cfg, learner, recs = lora_node
    from fednode.learning import lora

    ids = _ids(learner.tokenizer)
    learner.private.eval()
    expected_p = _logits(learner.private, ids)
    learner.private.base_model.set_adapter([lora.SHARED])  # the mesh's model: the shared adapter alone
    expected_m = _logits(learner.private, ids)
    learner.private.base_model.set_adapter([lora.SHARED, lora.PRIVATE])
    assert not torch.allclose(expected_p, expected_m)  # the private adapter did learn something of its own
    for what, expected in (("private", expected_p), ("merged", expected_m)):
        out = tmp_path / what
        result = export("--config", str(path), "--what", what, "--out", str(out))
        assert result.exit_code == 0, result.output
        model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
        assert type(model).__module__.startswith("transformers.") and not (out / "adapter_config.json").exists()
        torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=1e-5)
        assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)
    by_dir = CliRunner().invoke(humaneval, ["nll", "--limit", "2", "--model-dir", str(tmp_path / "private")])
    by_node = CliRunner().invoke(humaneval, ["nll", "--limit", "2", "--config", str(path)])
    assert by_dir.exit_code == 0 and by_node.exit_code == 0, (by_dir.output, by_node.output)
    a, b = json.loads(by_dir.stdout.splitlines()[-1]), json.loads(by_node.stdout.splitlines()[-1])
    assert a["bits_per_byte"] == pytest.approx(b["bits_per_byte"], abs=1e-4)  # export -> reload scores the same
    other = tmp_path / "other.toml"
    other.write_text(path.read_text().replace("lora_private_rank = 2", "lora_private_rank = 4"))
    line = one_line(export("--config", str(other), "--out", str(tmp_path / "o")), ExitCode.CONFIG)
    assert "lora_private_rank '2'" in line and "'4'" in line
