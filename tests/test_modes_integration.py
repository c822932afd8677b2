"""Real daemons on loopback, one small mesh per learning mode (`[learning] mode`).

Three meshes of `fednode run` processes (micro preset, tiny data) run side by side, each with its
own CA, for a fixed number of rounds (`[train] rounds`), after which the nodes keep serving:

- `local`   (2 nodes): nothing travels, nothing is merged, and the held-out loss still drops;
- `fedavg`  (3 nodes): the whole private model travels and every node merges its peers' models;
- `static`  (3 nodes, `static_level = 2`): the messenger travels at level 2; node-2 has
  `[budget] max_level = 0`, so it trains level 0 and its peers still merge its updates (nested
  aggregation). The plain static mesh and the mixed one are the same mesh to keep the run short:
  node-0 and node-1 are the plain static nodes.

Tests wait on conditions with timeouts, never on bare sleeps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fednode.config import LearningSection
from fednode.launcher import LocalMesh
from fednode.learning import messenger
from fednode.learning.compress import compress
from fednode.learning.models import build_model, resolve_preset, state_tensors
from fednode.learning.optim_state import model_tensors
from fednode.learning.tokenizer import build_tokenizer
from fednode.node.tensorstream import encode
from fednode.store.checkpoint import load_checkpoint, shared_name
from tools.harness.collect import read_rounds

ROUNDS = 8  # below 10: every update's header (round number) has the same length
STATIC_LEVEL = 2
LADDER = messenger.LADDERS["micro"]
FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 64, "max_tokens": 20_000},
    "train": {"steps_per_round": 2, "batch_size": 4, "round_timeout_s": 8.0, "threads": 1, "catchup_lag": 2,
              "rounds": ROUNDS},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 3.0, "dead_after_s": 8.0},
}
MESHES = {"local": 2, "fedavg": 3, "static": 3, "lora": 3}
LORA_RANKS = [2, 4, 8]
LOW = "node-2"  # static mesh: [budget] max_level = 0
START_TIMEOUT = 150.0


def _overrides(mode: str) -> dict:
    learning = {"mode": mode}
    if mode == "static":
        learning["static_level"] = STATIC_LEVEL
    if mode == "lora":  # a shared LoRA adapter on the frozen micro base, static at rank 4
        learning = {"mode": "static", "family": "lora", "static_level": 1, "lora_ranks": LORA_RANKS,
                    "lora_private_rank": 2}
    return {**FAST, "learning": learning}


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    """All three meshes, started together and run to their last round."""
    root = tmp_path_factory.mktemp("modes")
    made: dict[str, LocalMesh] = {}
    try:
        for mode, n in MESHES.items():
            made[mode] = LocalMesh.create(root / mode, n, code_bytes=60_000, overrides=_overrides(mode))
        made["static"].configure(LOW, "budget", max_level=0)
        made["lora"].configure(LOW, "budget", max_level=0)
        made["local"].prepare_tokenizer()
        for m in made.values():
            m.start_all()
        for m in made.values():
            for node in m.nodes:
                m.wait(node.name, lambda s: s["state"] == "done" and int(s["round"]) == ROUNDS, START_TIMEOUT)
        yield made
    finally:
        for m in made.values():
            m.stop_all(timeout=20)


def rounds_of(m: LocalMesh, name: str):
    return read_rounds(m.node(name).data_dir)


def cli_status(m: LocalMesh, name: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "fednode", "status", "--config", str(m.node(name).config_path),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def shared_file(m: LocalMesh, name: str) -> Path:
    """The newest `.shared` checkpoint: what this node serves over FetchState."""
    newest = rounds_of(m, name)[-1]
    return m.node(name).data_dir / "checkpoints" / shared_name(newest.checkpoint)


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def wire_size(tensors: dict[str, torch.Tensor], round_: int, sender: str) -> int:
    """Payload bytes of one pushed update, in the default codec (`exchange.push_update` encodes
    this exact layout)."""
    wire, meta = compress(tensors, LearningSection().update_codec)
    return encode(wire, {**meta, "round": str(round_), "sender": sender}).total_size


def level_tensors(level: int) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s) for k, s in messenger.level_shapes(LADDER, level).items()}


# ---------------------------------------------------------------------------------------------- local


def test_local_mode_sends_nothing_merges_nothing_and_still_learns(meshes):
    m = meshes["local"]
    for node in m.nodes:
        status = cli_status(m, node.name)
        assert status["mode"] == "local" and int(status["round"]) == ROUNDS
        assert int(status["bytes_sent"]) == 0 and int(status["bytes_received"]) == 0, status
        records = rounds_of(m, node.name)
        assert [r.round for r in records] == list(range(1, ROUNDS + 1))
        for r in records:
            assert r.source == "local" and r.merged_from == [] and r.bytes_sent == 0 and r.bytes_received == 0, r
        for prev, rec in zip(records, records[1:], strict=False):  # nothing changed the model between rounds
            assert math.isclose(rec.loss_before, prev.loss_after, rel_tol=1e-6), (prev, rec)
        assert records[-1].loss_after < records[0].loss_before, [(r.loss_before, r.loss_after) for r in records]
        checkpoints = sorted(p.name for p in (node.data_dir / "checkpoints").iterdir())
        assert checkpoints and not any(".shared." in name for name in checkpoints), checkpoints  # nothing to serve


# --------------------------------------------------------------------------------------------- fedavg


def test_fedavg_mode_pushes_and_merges_the_whole_model(meshes):
    m = meshes["fedavg"]
    names = [n.name for n in m.nodes]
    tokenizer = build_tokenizer(m.workdir / "cache" / "tokenizers", vocab_size=4096)
    whole_model = shapes(state_tensors(build_model(resolve_preset("micro"), tokenizer, seed=0)))
    for name in names:
        status = cli_status(m, name)
        assert status["mode"] == "fedavg" and int(status["round"]) == ROUNDS

        shared, meta = load_checkpoint(shared_file(m, name))
        full, _ = load_checkpoint(shared_file(m, name).with_name(rounds_of(m, name)[-1].checkpoint))
        assert any(k.startswith("optim.") for k in full)  # the checkpoint also keeps Adam's moments ...
        full = model_tensors(full)  # ... which never travel
        assert meta["mode"] == "fedavg"
        assert shapes(shared) == whole_model  # what travels is the whole private model ...
        assert shared.keys() == full.keys() and all(torch.equal(shared[k], full[k]) for k in full)  # ... exactly

        records = rounds_of(m, name)
        merged = set().union(*(set(r.merged_from) for r in records))
        assert merged == set(names) - {name}, (name, [(r.round, r.merged_from) for r in records])
        pushes = 0
        for r in records:
            if r.source != "local":  # a catch-up round (fetched state) pushes nothing
                assert r.source.startswith("fetched:") and r.bytes_sent == 0, r
                continue
            per_push = wire_size(shared, r.round, name)  # one whole model on the wire
            assert r.bytes_sent % per_push == 0 and r.bytes_sent // per_push <= len(names) - 1, (r, per_push)
            pushes += r.bytes_sent // per_push
            # what arrived is a whole model per merged peer (names and round numbers have equal lengths)
            assert r.bytes_received == len(r.merged_from) * per_push, (r, per_push)
        assert pushes >= ROUNDS // 2, (name, pushes)
        data_bytes = sum(t.numel() * t.element_size() for t in shared.values())
        wire, _ = compress(shared, LearningSection().update_codec)
        wire_bytes = sum(t.numel() * t.element_size() for t in wire.values())
        file_size = shared_file(m, name).stat().st_size
        per_push = wire_size(shared, ROUNDS, name)
        assert 0 < per_push - wire_bytes < 4096 and 0 < file_size - data_bytes < 4096  # both: tensors + header
        assert wire_bytes < data_bytes / 3.5  # int8 by default: ~3.8x fewer bytes than the float32 file
        assert int(status["bytes_sent"]) >= pushes * per_push


# --------------------------------------------------------------------------------------------- static


def test_static_mode_status_rounds_and_low_ceiling_peer_is_merged(meshes):
    m = meshes["static"]
    names = [n.name for n in m.nodes]
    for name in names:
        status = cli_status(m, name)
        assert status["mode"] == "static" and int(status["round"]) == ROUNDS
        assert int(status["ceiling"]) == (0 if name == LOW else LADDER.top), status
        records = rounds_of(m, name)
        assert records and all(r.epoch == 0 for r in records)  # static: never renegotiated
        assert any(r.merged_from for r in records), name
        shared, meta = load_checkpoint(shared_file(m, name))
        assert meta["mode"] == "static" and not any(k.startswith("private.") for k in shared)
        assert shapes(shared) == messenger.level_shapes(LADDER, int(meta["level"]))  # a ladder slice
    for name in names:
        if name != LOW:  # nested aggregation: the level-0 peer is never excluded
            assert any(LOW in r.merged_from for r in rounds_of(m, name)), name


def test_static_mode_trains_and_shares_the_static_level(meshes):
    m = meshes["static"]
    for name in [n.name for n in m.nodes if n.name != LOW]:
        status = cli_status(m, name)
        assert int(status["trained_level"]) == STATIC_LEVEL, status
        records = rounds_of(m, name)
        assert [r.level for r in records] == [STATIC_LEVEL] * len(records), [(r.round, r.level) for r in records]
        shared, meta = load_checkpoint(shared_file(m, name))
        assert int(meta["level"]) == STATIC_LEVEL
        assert shapes(shared) == messenger.level_shapes(LADDER, STATIC_LEVEL)
        for r in records:
            if r.source == "local":
                per_push = wire_size(level_tensors(STATIC_LEVEL), r.round, name)
                assert r.bytes_sent % per_push == 0, (r, per_push)


def test_static_mixed_mesh_low_ceiling_node_trains_level_0_and_peers_merge_it(meshes):
    m = meshes["static"]
    low = rounds_of(m, LOW)
    assert {r.level for r in low} == {0}
    shared, _ = load_checkpoint(shared_file(m, LOW))
    assert shapes(shared) == messenger.level_shapes(LADDER, 0)
    assert any(r.merged_from for r in low)  # it merges its peers' level-2 updates into its own slice
    for name in [n.name for n in m.nodes if n.name != LOW]:
        records = rounds_of(m, name)
        assert {r.level for r in records} == {STATIC_LEVEL}
        assert any(LOW in r.merged_from for r in records if r.level == STATIC_LEVEL), name



# ----------------------------------------------------------------------------------------------- lora


def test_lora_mesh_sends_only_the_shared_adapters_rank_and_merges_a_lower_rank_peer(meshes):
    """Real daemons of the lora family: what each serves is the shared adapter at its level's rank
    (never the base, never the private adapter), a fraction of the whole model; the rank-2 peer
    (max_level 0) is merged by the rank-4 ones; checkpoints keep both adapters and Adam's moments."""
    m = meshes["lora"]
    names = [n.name for n in m.nodes]
    whole = wire_size(shapes_to_zeros(shapes(state_tensors(build_model(resolve_preset("micro"), build_tokenizer(
        m.workdir / "cache" / "tokenizers", vocab_size=4096), seed=0)))), ROUNDS, "node-0")
    for name in names:
        status = cli_status(m, name)
        assert status["mode"] == "static" and int(status["round"]) == ROUNDS, status
        shared, meta = load_checkpoint(shared_file(m, name))
        rank = LORA_RANKS[0 if name == LOW else 1]
        assert int(meta["level"]) == (0 if name == LOW else 1), meta
        assert shared and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in shared), sorted(shared)[:4]
        assert all((t.shape[0] if ".lora_A." in k else t.shape[1]) == rank for k, t in shared.items())
        full, full_meta = load_checkpoint(shared_file(m, name).with_name(rounds_of(m, name)[-1].checkpoint))
        assert full_meta["family"] == "lora", full_meta
        assert any(".lora_A.private." in k for k in full) and any(k.startswith("optim.") for k in full)
        assert not any("base_layer" in k or "embed_tokens" in k for k in full)  # the frozen base is not saved
        records = rounds_of(m, name)
        assert any(r.merged_from for r in records), name
        local = [r for r in records if r.source == "local" and r.bytes_sent]
        assert local and all(r.bytes_sent < whole / 4 for r in local), (whole, [r.bytes_sent for r in local])
    for name in names:
        if name != LOW:
            assert any(LOW in r.merged_from for r in rounds_of(m, name)), name


def shapes_to_zeros(s: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v) for k, v in s.items()}
