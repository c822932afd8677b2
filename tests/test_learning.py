"""Learning layer: tokenizer, models, data, local training and aggregation (real, offline, CPU)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fednode.errors import ConfigError, ProtocolError, Reason
from fednode.learning.aggregate import fedavg, validate_update
from fednode.learning.data import (
    TokenDataset,
    assign_groups,
    list_code_files,
    stdlib_files,
    stdlib_partitions,
    stdlib_root,
    write_partition,
)
from fednode.learning.models import (
    PRESETS,
    build_model,
    count_parameters,
    family_hash,
    load_state_tensors,
    state_tensors,
)
from fednode.learning.tokenizer import build_tokenizer, select_corpus, tokenizer_hash
from fednode.learning.trainer import LocalTrainer, TrainResult, evaluate

TRAINED_VOCAB = 1024  # not shipped: exercises the train-and-cache path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """The shipped default tokenizer (what every node loads)."""
    return build_tokenizer(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def trained_tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokcache"), vocab_size=TRAINED_VOCAB)


@pytest.fixture(scope="module")
def small_data_dir(tmp_path_factory) -> Path:
    """A few hundred kB of real stdlib code, copied like a node's data dir."""
    dest = tmp_path_factory.mktemp("data")
    files = [stdlib_root() / name for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py")]
    write_partition(files, dest)
    return dest


# --- tokenizer ---------------------------------------------------------------------------------

_BUILD = (
    "import sys; from pathlib import Path;"
    "from fednode.learning.tokenizer import build_tokenizer, tokenizer_hash;"
    f"print(tokenizer_hash(build_tokenizer(Path(sys.argv[1]), vocab_size={TRAINED_VOCAB})))"
)

# Pinned: every site must load exactly this tokenizer. Rebuilding the asset changes it on purpose
# (scripts/build_tokenizer_asset.py) and then this constant changes with it.
SHIPPED_4096_HASH = "20a4f484e913e5994fbf35a8ab21f2e77586fd461005cc323d2b5a7ba2adce9d"


def test_default_tokenizer_is_the_shipped_asset_and_writes_no_cache(tok, tmp_path):
    again = build_tokenizer(tmp_path)
    assert tokenizer_hash(again) == tokenizer_hash(tok) == SHIPPED_4096_HASH
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_build_is_deterministic_across_processes(trained_tok, tmp_path):
    # two fresh processes race to build into one new cache dir; the fixture built in another dir
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    hashes = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(hashes[0]) == 64
    assert hashes[0] == hashes[1] == tokenizer_hash(trained_tok)
    assert Path(trained_tok.name_or_path).parent != tmp_path
    assert len(list(tmp_path.iterdir())) == 1  # one cache entry, no temp dirs left behind


def test_tokenizer_cache_reuse_and_special_tokens(tok, tmp_path):
    assert len(tok) == 4096
    assert tok.eos_token == "<|endoftext|>" and tok.bos_token_id == tok.eos_token_id
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    text = "def add(a, b):\n    return a + b  # é\n"
    ids = tok(text)["input_ids"]
    assert tok.eos_token_id not in ids  # no special tokens added implicitly
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # the BPE really compresses code


def test_tokenizer_cache_dir_is_reused(trained_tok, tmp_path_factory):
    cache = Path(trained_tok.name_or_path).parent
    entries = list(cache.iterdir())
    prefix = f"bpe-{TRAINED_VOCAB}-"
    assert [e.name for e in entries if e.name.startswith(prefix)] == [Path(trained_tok.name_or_path).name]
    again = build_tokenizer(cache, vocab_size=TRAINED_VOCAB)  # loads, does not retrain
    assert tokenizer_hash(again) == tokenizer_hash(trained_tok)
    assert sorted(e.name for e in cache.iterdir()) == sorted(e.name for e in entries)


def test_tokenizer_build_loses_rename_race_gracefully(trained_tok, tmp_path, monkeypatch):
    import fednode.learning.tokenizer as tokmod

    built = Path(trained_tok.name_or_path)

    def fake_train(root, entries, vocab_size, out_dir):
        shutil.copytree(built, out_dir, dirs_exist_ok=True)
        shutil.copytree(built, tmp_path / built.name)  # "another process" finishes first

    monkeypatch.setattr(tokmod, "_train", fake_train)
    again = build_tokenizer(tmp_path, vocab_size=TRAINED_VOCAB)
    assert tokenizer_hash(again) == tokenizer_hash(trained_tok)
    assert [e.name for e in tmp_path.iterdir()] == [built.name]


def test_tokenizer_hash_differs_for_other_tokenizers(tok):
    other = json.loads(tok.backend_tokenizer.to_str())
    other["model"]["merges"] = other["model"]["merges"][:-1]
    from tokenizers import Tokenizer

    changed = Tokenizer.from_str(json.dumps(other))

    class _Wrap:
        backend_tokenizer = changed

    assert tokenizer_hash(_Wrap()) != tokenizer_hash(tok)


def test_select_corpus_is_budgeted_and_sorted():
    entries = [(f"m{i}.py", 100) for i in range(50)] + [("empty.py", 0)]
    chosen = select_corpus(entries, budget=1000)
    assert len(chosen) == 10 and chosen == sorted(chosen)
    assert ("empty.py", 0) not in chosen
    assert select_corpus(list(reversed(entries)), budget=1000) == chosen


# --- models ------------------------------------------------------------------------------------


def test_build_model_is_deterministic_from_seed(tok):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = state_tensors(build_model("micro", tok, seed=7))
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    b = state_tensors(build_model("micro", tok, seed=7))
    c = state_tensors(build_model("micro", tok, seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_presets_and_family_hash(tok):
    assert {"tiny", "micro"} <= set(PRESETS)
    tiny = build_model("tiny", tok, seed=0)
    assert 0.5e6 < count_parameters(tiny) < 1.5e6
    assert tiny.config.tie_word_embeddings and tiny.lm_head.weight is tiny.model.embed_tokens.weight
    assert tiny.config.eos_token_id == tok.eos_token_id and tiny.config.pad_token_id == tok.pad_token_id
    assert family_hash(PRESETS["tiny"]) != family_hash(PRESETS["micro"])
    assert family_hash(PRESETS["tiny"]) == family_hash(PRESETS["tiny"])
    with pytest.raises(ConfigError, match="micro.*tiny"):
        build_model("huge-typo", tok, seed=0)


def test_state_tensors_round_trip(tok):
    src = build_model("micro", tok, seed=1)
    dst = build_model("micro", tok, seed=2)
    state = state_tensors(src)
    assert "lm_head.weight" not in state
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in state.values())
    load_state_tensors(dst, state)
    assert all(torch.equal(state[k], v) for k, v in state_tensors(dst).items())
    assert torch.equal(dst.lm_head.weight, state["model.embed_tokens.weight"])  # still tied
    with torch.no_grad():
        src.model.embed_tokens.weight.add_(1.0)
    assert not torch.equal(state["model.embed_tokens.weight"], src.model.embed_tokens.weight)  # a copy

    name = "model.norm.weight"
    with pytest.raises(ValueError, match="missing tensor"):
        load_state_tensors(dst, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="unknown tensor 'bogus'"):
        load_state_tensors(dst, {**state, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=name):
        load_state_tensors(dst, {**state, name: torch.zeros(3)})


# --- data --------------------------------------------------------------------------------------


def test_list_code_files_skips_tests_hidden_and_binary(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "b.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "a.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "tests" / "test_a.py").write_text("assert True\n")
    (tmp_path / ".hidden" / "c.py").write_text("z = 3\n")
    (tmp_path / "pkg" / "__pycache__" / "d.py").write_text("w = 4\n")
    (tmp_path / "bin.py").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin.py").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "notes.txt").write_text("hello\n")
    assert [p.relative_to(tmp_path).as_posix() for p in list_code_files(tmp_path)] == ["b.py", "pkg/a.py"]


def _top(path: Path) -> str:
    parts = path.relative_to(stdlib_root()).parts
    return parts[0] if len(parts) > 1 else "<module>"


def test_stdlib_partitions_disjoint_nonempty_deterministic_noniid():
    parts = stdlib_partitions(4, seed=0)
    assert len(parts) == 4 and all(parts)
    flat = [p for part in parts for p in part]
    assert len(flat) == len(set(flat)) == len(stdlib_files())  # disjoint and complete
    assert parts == stdlib_partitions(4, seed=0)
    assert parts != stdlib_partitions(4, seed=1)
    packages = [{_top(p) for p in part} - {"<module>"} for part in parts]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not packages[i] & packages[j]  # whole packages never split across nodes
    sizes = [sum(p.stat().st_size for p in part) for part in parts]
    assert max(sizes) < 2 * min(sizes)
    with pytest.raises(ConfigError):
        stdlib_partitions(0)


def test_stdlib_partitions_many_nodes_all_nonempty():
    parts = stdlib_partitions(60, seed=3)
    assert len(parts) == 60 and all(parts)


def test_assign_groups_balances():
    owner = assign_groups([5, 4, 3, 3, 1], 2)
    loads = [sum(s for s, o in zip([5, 4, 3, 3, 1], owner, strict=True) if o == k) for k in range(2)]
    assert sorted(loads) == [8, 8]


def test_write_partition_budget_and_content(tmp_path):
    files = [stdlib_root() / "json" / "decoder.py", stdlib_root() / "email" / "utils.py"]
    n = write_partition(files, tmp_path / "d")
    out = sorted((tmp_path / "d").iterdir())
    assert n == sum(f.stat().st_size for f in files) and len(out) == 2
    assert sorted(o.read_bytes() for o in out) == sorted(f.read_bytes() for f in files)
    budget = max(f.stat().st_size for f in files)
    small = write_partition(files, tmp_path / "e", max_bytes=budget)  # only one file fits
    assert small in {f.stat().st_size for f in files} and len(list((tmp_path / "e").iterdir())) == 1
    empty = tmp_path / "__init__.py"
    empty.write_text("")
    cut = write_partition([empty, *files], tmp_path / "f", max_bytes=1000)  # no file with code fits: a prefix
    only = max((tmp_path / "f").iterdir(), key=lambda p: p.stat().st_size)
    assert 0 < cut <= 1000 and files[0].read_bytes().startswith(only.read_bytes())
    assert only.read_bytes().endswith(b"\n")


def test_token_dataset(tok, small_data_dir):
    ds = TokenDataset.from_dir(small_data_dir, tok, seq_len=64, seed=0)
    assert ds.seq_len == 64 and ds.num_tokens > 1000
    held = ds.heldout_batches(4)
    assert held and all(b.dtype == torch.long and b.shape[1] == 64 for b in held)
    a = list(ds.train_batches(3, steps=2, seed=5))
    b = list(ds.train_batches(3, steps=2, seed=5))
    assert len(a) == 2 and a[0].shape == (3, 64) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    again = TokenDataset.from_dir(small_data_dir, tok, seq_len=64, seed=0)
    assert torch.equal(again.heldout_blocks, ds.heldout_blocks)
    capped = TokenDataset.from_dir(small_data_dir, tok, seq_len=64, max_tokens=640)
    assert capped.num_tokens + capped.heldout_blocks.numel() == 640


def test_token_dataset_empty_dir_is_config_error(tok, tmp_path):
    with pytest.raises(ConfigError, match=r"\[data\] dir .* has no code files matching include"):
        TokenDataset.from_dir(tmp_path, tok, seq_len=64)


# --- training ----------------------------------------------------------------------------------


def test_local_training_lowers_heldout_loss(tok, small_data_dir):
    ds = TokenDataset.from_dir(small_data_dir, tok, seq_len=64, holdout_fraction=0.1, seed=0)
    model = build_model("micro", tok, seed=0)
    trainer = LocalTrainer(model, lr=1e-2)
    result = trainer.train(ds, steps=15, batch_size=8, seed=0)
    assert isinstance(result, TrainResult)
    assert result.loss_before == pytest.approx(math.log(4096), abs=0.3)
    assert result.loss_after < result.loss_before - 0.5
    assert result.steps == 15 and result.tokens == 15 * 8 * 64 and result.seconds > 0
    assert evaluate(model, ds.heldout_batches(8)) == pytest.approx(result.loss_after, rel=1e-4)
    state = trainer.optimizer_state()
    assert state["state"]
    trainer.load_optimizer_state(state)


# --- aggregation -------------------------------------------------------------------------------


def test_fedavg_uniform_and_weighted():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([4.0])}
    out = fedavg([(a, 1.0), (b, 1.0)])
    assert torch.allclose(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.allclose(out["b"], torch.tensor([2.0]))
    out = fedavg([(a, 3.0), (b, 1.0)])
    assert torch.allclose(out["w"], torch.tensor([1.5, 3.0]))
    assert torch.allclose(out["b"], torch.tensor([1.0]))
    assert torch.equal(a["w"], torch.tensor([1.0, 2.0]))  # inputs untouched
    bf16 = torch.bfloat16
    half = fedavg([({"h": torch.ones(2, dtype=bf16)}, 1), ({"h": torch.zeros(2, dtype=bf16)}, 1)])
    assert half["h"].dtype == bf16 and torch.equal(half["h"], torch.full((2,), 0.5, dtype=bf16))


def test_fedavg_names_missing_from_some_contributions():
    a = {"x": torch.tensor([1.0])}
    b = {"x": torch.tensor([3.0]), "y": torch.tensor([5.0])}
    out = fedavg([(a, 1.0), (b, 1.0)])
    assert torch.equal(out["x"], torch.tensor([2.0])) and torch.equal(out["y"], torch.tensor([5.0]))


def test_fedavg_nested_prefix_per_coordinate():
    small = {"w": torch.full((2, 2), 1.0)}
    big = {"w": torch.arange(16.0).view(4, 4)}
    out = fedavg([(big, 1.0), (small, 1.0)])["w"]
    assert out.shape == (4, 4)
    assert torch.equal(out[:2, :2], (big["w"][:2, :2] + 1.0) / 2)  # overlap: averaged over both
    assert torch.equal(out[2:, :], big["w"][2:, :]) and torch.equal(out[:, 2:], big["w"][:, 2:])
    weighted = fedavg([(big, 1.0), (small, 3.0)])["w"]
    assert torch.equal(weighted[:2, :2], (big["w"][:2, :2] + 3.0) / 4)
    receiver_small = fedavg([(small, 1.0), (big, 1.0)])["w"]
    assert receiver_small.shape == (2, 2) and torch.equal(receiver_small, (big["w"][:2, :2] + 1.0) / 2)


@pytest.mark.parametrize("weight", [0.0, -1.0, math.nan, math.inf, "x"])
def test_fedavg_rejects_bad_weights(weight):
    with pytest.raises(ValueError, match="weight"):
        fedavg([({"w": torch.ones(1)}, 1.0), ({"w": torch.ones(1)}, weight)])


def test_fedavg_rejects_empty_and_rank_mismatch():
    with pytest.raises(ValueError):
        fedavg([])
    with pytest.raises(ValueError, match="dims"):
        fedavg([({"w": torch.ones(2)}, 1.0), ({"w": torch.ones(2, 2)}, 1.0)])


def _reason(exc_info) -> int:
    return exc_info.value.reason


def test_validate_update():
    ref = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    validate_update({"w": torch.ones(4, 4), "b": torch.ones(4)}, ref, max_norm=100.0)
    validate_update({"w": torch.ones(2, 3)}, ref)  # a prefix of the reference is fine
    cases = [
        ({"w": torch.full((4, 4), math.nan)}, {}, Reason.NOT_FINITE),
        ({"b": torch.tensor([0.0, math.inf, 0.0, 0.0])}, {}, Reason.NOT_FINITE),
        ({"w": torch.ones(5, 4)}, {}, Reason.SHAPE_MISMATCH),
        ({"w": torch.ones(16)}, {}, Reason.SHAPE_MISMATCH),
        ({"b": torch.ones(4, dtype=torch.float64)}, {}, Reason.SHAPE_MISMATCH),
        ({"extra": torch.ones(4)}, {}, Reason.SHAPE_MISMATCH),
        ({"w": torch.full((4, 4), 1e6)}, {"max_norm": 1e3}, Reason.MALFORMED),
        ({}, {}, Reason.MALFORMED),
        ({"w": [1.0, 2.0]}, {}, Reason.MALFORMED),
    ]
    for tensors, kwargs, reason in cases:
        with pytest.raises(ProtocolError) as exc_info:
            validate_update(tensors, ref, **kwargs)
        assert _reason(exc_info) == reason, tensors


def test_models_built_at_once_in_threads_equal_one_built_alone(tok):
    """Nodes of one process (simulation harness, demo) build their models together: the same seed
    must give the same weights, or FedAvg averages unrelated models (it did, until a lock)."""
    import threading

    from fednode.learning.models import build_model, state_tensors

    built: dict[int, dict] = {}

    def build(i: int) -> None:
        built[i] = state_tensors(build_model("micro", tok, seed=0))

    threads = [threading.Thread(target=build, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = state_tensors(build_model("micro", tok, seed=0))
    for i in range(4):
        assert all(torch.equal(built[i][k], alone[k]) for k in alone), i
