"""Faults against real daemon processes (issue 6, part 1): kill -9 while training, while receiving
and while writing a checkpoint; a restart storm; a partition whose halves negotiate apart and
reconcile on heal; a slow peer and a peer that stalls mid-stream.

After each: no committed round is lost or changed, every node resumes, and the mesh commits new
rounds within a bound. Committed rounds are read from the journals on disk.
"""

from __future__ import annotations

import pytest

from fednode.store.checkpoint import load_checkpoint
from tools.harness import ProcessHarness

BASE = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 32, "max_tokens": 4_000},
    "train": {"steps_per_round": 2, "batch_size": 2, "round_timeout_s": 5.0},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
PROGRESS_BOUND_S = 120  # a resumed mesh must commit new rounds within this


def merged(*layers: dict) -> dict:
    out: dict = {}
    for layer in layers:
        for section, values in layer.items():
            out[section] = {**out.get(section, {}), **values}
    return out


def committed(h: ProcessHarness, name: str) -> dict[int, tuple]:
    return {r.round: (r.checkpoint, r.checkpoint_sha256, r.epoch, r.level, r.source) for r in h.rounds(name)}


def assert_kept(before: dict[int, tuple], after: dict[int, tuple], name: str) -> None:
    lost = {r: v for r, v in before.items() if after.get(r) != v}
    assert not lost, f"{name}: committed rounds lost or changed: {sorted(lost)}"


def assert_checkpoints_intact(h: ProcessHarness, name: str, keep: int) -> None:
    """The newest `keep` rounds' checkpoints load and match the journal's sha256."""
    for rec in h.rounds(name)[-keep:]:
        load_checkpoint(h.data_dir(name) / "checkpoints" / rec.checkpoint, rec.checkpoint_sha256)


def resume_and_progress(h: ProcessHarness, names: list[str]) -> None:
    for name in names:
        h.restart(name)
    h.wait_members(timeout=PROGRESS_BOUND_S)
    mark = max(int(s["round"]) for s in h.wait_until("status", lambda st: True, 30).values())
    h.wait_round(mark + 2, timeout=PROGRESS_BOUND_S)


@pytest.fixture
def mesh(tmp_path, request):
    overrides = merged(BASE, getattr(request, "param", {}))
    with ProcessHarness(tmp_path, 3, overrides=overrides, code_bytes=30_000) as h:
        h.start()
        h.wait_members(timeout=120)
        yield h


@pytest.mark.parametrize("mesh", [{"train": {"steps_per_round": 60}}], indirect=True)
def test_kill9_while_training_then_a_restart_storm(mesh):
    h = mesh
    h.wait_round(1, timeout=120)
    h.wait_until("node-1 training", lambda st: st["node-1"]["state"] == "training", 60, names=["node-1"], poll=0.05)
    h.kill("node-1")
    before = committed(h, "node-1")
    assert before
    resume_and_progress(h, ["node-1"])
    assert_kept(before, committed(h, "node-1"), "node-1")
    assert_checkpoints_intact(h, "node-1", keep=2)

    # restart storm: every node killed -9 and restarted within a second or two
    for name in h.names:
        h.kill(name)
    before = {name: committed(h, name) for name in h.names}
    resume_and_progress(h, h.names)
    for name in h.names:
        assert_kept(before[name], committed(h, name), name)


@pytest.mark.parametrize("mesh", [{"limits": {"chunk_kib": 8}, "train": {"round_timeout_s": 15.0}}], indirect=True)
def test_kill9_while_receiving_a_messenger(mesh):
    h = mesh
    h.wait_round(1, timeout=120)
    h.set_latency(100, ["node-0"])  # node-0's pushes now take seconds (100 ms per 8 KiB chunk)
    h.wait_until("node-0 pushing", lambda st: st["node-0"]["state"] == "pushing", 90, names=["node-0"], poll=0.05)
    h.kill("node-1")
    before = committed(h, "node-1")
    h.set_latency(0)
    resume_and_progress(h, ["node-1"])
    assert_kept(before, committed(h, "node-1"), "node-1")


@pytest.mark.parametrize("point", ["atomic.fsynced", "journal.round_inserted"])
def test_kill9_while_writing_a_checkpoint_or_committing(mesh, point):
    h = mesh
    h.wait_round(2, timeout=120)
    h.crash_at("node-2", point)
    proc = h.mesh.procs["node-2"]
    h.wait_until("node-2 crashes at the write point", lambda _st: proc.poll() is not None, 60, names=["node-0"])
    assert proc.returncode == -9
    before = committed(h, "node-2")
    assert_checkpoints_intact(h, "node-2", keep=1)
    h.crash_at("node-2")  # clear the plan before the restart
    resume_and_progress(h, ["node-2"])
    after = committed(h, "node-2")
    assert_kept(before, after, "node-2")
    assert max(after) > max(before), "the interrupted round was redone or caught up after the restart"
    assert_checkpoints_intact(h, "node-2", keep=2)


EAGER = {"negotiation": {"plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0, "min_round_gap": 1,
                         "activation_delay": 3, "min_live_peers": 2}}


@pytest.mark.parametrize("mesh", [EAGER], indirect=True)
def test_partition_halves_negotiate_apart_and_reconcile_to_the_highest_epoch(mesh):
    h = mesh
    h.wait_round(1, timeout=120)
    h.partition(["node-0", "node-1"], ["node-2"])
    h.wait_until("each side sees only its own group", lambda st: (
        st["node-0"]["peers_alive"] == 1 and st["node-1"]["peers_alive"] == 1 and st["node-2"]["peers_alive"] == 0),
        60)
    st = h.wait_until("the pair grows while the lone node cannot (min_live_peers 2)",
                      lambda st: st["node-0"]["level"] >= 1 and st["node-1"]["level"] >= 1, 180)
    assert st["node-2"]["level"] == 0
    before = {name: committed(h, name) for name in h.names}
    h.heal()
    h.wait_members(timeout=60)
    st = h.wait_until("one epoch and level everywhere", lambda st: (
        len({(s["epoch"], s["level"]) for s in st.values()}) == 1 and st["node-2"]["level"] >= 1), 180)
    assert st["node-2"]["epoch"] >= before["node-0"][max(before["node-0"])][2]
    mark = max(int(s["round"]) for s in st.values())
    h.wait_round(mark + 1, timeout=PROGRESS_BOUND_S)
    for name in h.names:
        assert_kept(before[name], committed(h, name), name)


def test_slow_peer_and_stalling_peer_never_block_rounds(mesh):
    h = mesh
    h.wait_round(1, timeout=120)
    h.set_latency(400, ["node-2"])
    mark = int(h.status("node-0")["round"])
    h.wait_round(mark + 2, timeout=PROGRESS_BOUND_S)  # every node, the slow one included
    h.set_latency(0, ["node-2"])
    h.stall("node-2", after_chunks=1)  # sends its envelope start, then hangs mid-stream
    mark = max(int(s["round"]) for s in h.wait_until("status", lambda st: True, 30).values())
    h.wait_round(mark + 3, timeout=PROGRESS_BOUND_S, names=["node-0", "node-1"])
    stalled = [r for name in ("node-0", "node-1") for r in h.rounds(name) if r.round > mark + 1]
    assert stalled and all("node-2" not in r.merged_from for r in stalled), "a stalled update was never merged"
