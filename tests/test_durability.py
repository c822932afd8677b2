"""Durability beyond power loss (tests/test_store_crash.py): a full disk at every write of a
round's commit, and corrupt or truncated state found at start.

A full disk is reported as one line naming the file and the fix, and the last committed state
stays intact and loadable. At start a node falls back to the newest checkpoint whose hash matches
the journal, or refuses (exit 5, one line) when nothing committed is usable: it never trains from
garbage. The start-up cases run the real `fednode run` process.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fednode.errors import ExitCode, StoreError
from fednode.launcher import LocalMesh
from fednode.store import atomic
from fednode.store.checkpoint import latest_good_round, load_checkpoint, save_checkpoint
from fednode.store.journal import Journal, RoundRecord

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def record(n: int, name: str, sha: str) -> RoundRecord:
    return RoundRecord(round=n, epoch=0, level=0, checkpoint=name, checkpoint_sha256=sha, loss_before=1.0,
                       loss_after=0.5, tokens=10, bytes_sent=0, bytes_received=0, merged_from=[], source="local",
                       committed_unix_ms=0)


def committed(tmp_path: Path, rounds: int = 2) -> tuple[Journal, Path, dict[int, dict[str, torch.Tensor]]]:
    """A journal with `rounds` committed rounds and their checkpoints, as a node leaves them."""
    ckpt = tmp_path / "checkpoints"
    journal = Journal.open(tmp_path / "journal.db")
    states = {}
    for n in range(1, rounds + 1):
        states[n] = {"w": torch.full((64, 64), float(n)), "b": torch.arange(8, dtype=torch.float32) * n}
        name, sha = save_checkpoint(ckpt, n, states[n], {"round": str(n)})
        journal.commit_round(record(n, name, sha))
    return journal, ckpt, states


def assert_last_good_is(journal: Journal, ckpt: Path, states, n: int) -> None:
    found = latest_good_round(journal, ckpt)
    assert found is not None
    rec, tensors, _ = found
    assert rec.round == n and all(torch.equal(tensors[k], states[n][k]) for k in states[n])


def no_tmp(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("where", ["write", "fsync", "rename", "dir_fsync"])
def test_disk_full_while_writing_a_checkpoint_is_one_line_and_the_last_round_stays_loadable(
        tmp_path, monkeypatch, where):
    journal, ckpt, states = committed(tmp_path)
    target = {"write": (atomic.os, "write"), "fsync": (atomic.os, "fsync"), "rename": (atomic.os, "replace"),
              "dir_fsync": (atomic, "fsync_dir")}[where]

    def full(*args, **kwargs):
        raise ENOSPC

    monkeypatch.setattr(*target, full)
    with pytest.raises(StoreError) as err:
        save_checkpoint(ckpt, 3, {"w": torch.zeros(64, 64)}, {"round": "3"})
    monkeypatch.undo()
    message = str(err.value)
    assert "disk is full" in message and ("round-00000003.safetensors" in message or str(ckpt) in message)
    assert "\n" not in message and "free space" in message
    assert no_tmp(ckpt)
    assert_last_good_is(journal, ckpt, states, 2)  # nothing committed was touched
    journal.close()


class FullDisk:
    """A sqlite3 connection whose writes fail as SQLite reports a full disk."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith(("INSERT", "COMMIT")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_disk_full_while_committing_the_journal_row_is_one_line_and_the_round_is_not_committed(tmp_path):
    journal, ckpt, states = committed(tmp_path)
    name, sha = save_checkpoint(ckpt, 3, {"w": torch.zeros(64, 64)}, {"round": "3"})
    real = journal._conn
    journal._conn = FullDisk(real)
    with pytest.raises(StoreError) as err:
        journal.commit_round(record(3, name, sha))
    journal._conn = real
    message = str(err.value)
    assert "journal" in message and "disk is full" in message and "\n" not in message
    journal.close()
    reopened = Journal.open(tmp_path / "journal.db")
    try:
        assert [r.round for r in reopened.rounds()] == [1, 2]  # round 3 never half-committed
        assert_last_good_is(reopened, ckpt, states, 2)
        reopened.commit_round(record(3, name, sha))  # once there is space again, the node goes on
        assert reopened.last_round().round == 3
    finally:
        reopened.close()


# --------------------------------------------------------------------------- damage found at start (store)


def test_a_missing_newest_checkpoint_falls_back_to_the_previous_round(tmp_path):
    journal, ckpt, states = committed(tmp_path, rounds=3)
    (ckpt / journal.round(3).checkpoint).unlink()
    assert_last_good_is(journal, ckpt, states, 2)
    journal.close()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "swap"])
def test_a_damaged_checkpoint_is_never_loaded(tmp_path, damage):
    journal, ckpt, states = committed(tmp_path, rounds=3)
    newest = ckpt / journal.round(3).checkpoint
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) - 7] ^= 1  # a tensor byte: still parses, only the hash can tell
    elif damage == "empty":
        data = bytearray()
    else:  # an intact file from another round under this round's name
        data = bytearray((ckpt / journal.round(1).checkpoint).read_bytes())
    newest.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"checkpoint {newest} is corrupt or truncated.*delete it or restore it"):
        load_checkpoint(newest, journal.round(3).checkpoint_sha256)
    assert_last_good_is(journal, ckpt, states, 2)
    journal.close()


def test_a_torn_wal_tail_loses_no_committed_round(tmp_path):
    journal, ckpt, states = committed(tmp_path, rounds=3)
    wal = tmp_path / "journal.db-wal"
    journal._conn.execute("PRAGMA wal_autocheckpoint=0")  # keep the rounds in the WAL
    name, sha = save_checkpoint(ckpt, 4, states[3], {"round": "4"})
    journal.commit_round(record(4, name, sha))
    size = wal.stat().st_size
    with open(wal, "ab") as f:  # a half-written frame after the last commit, as after power loss
        f.write(os.urandom(3000))
    copy = tmp_path / "copy"
    copy.mkdir()
    for suffix in ("", "-wal"):  # reopen a copy taken while the writer is still open (no checkpoint-on-close)
        (copy / f"journal.db{suffix}").write_bytes((tmp_path / f"journal.db{suffix}").read_bytes())
    journal.close()
    assert size > 0
    reopened = Journal.open(copy / "journal.db")
    try:
        assert [r.round for r in reopened.rounds()] == [1, 2, 3, 4]
    finally:
        reopened.close()


# --------------------------------------------------------------------------- damage found at start (daemon)


FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 64, "max_tokens": 20_000},
    "train": {"steps_per_round": 1, "batch_size": 4, "round_timeout_s": 3.0, "threads": 1, "rounds": 3},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0, "seeds": []},
}


@pytest.fixture(scope="module")
def stopped_node(tmp_path_factory):
    """A node that committed 3 rounds and was drained: its data dir is what the tests damage."""
    m = LocalMesh.create(tmp_path_factory.mktemp("durable"), 1, code_bytes=30_000, overrides=FAST)
    m.prepare_tokenizer()
    m.start("node-0")
    try:
        m.wait("node-0", lambda s: int(s["round"]) >= 3, 120)
    finally:
        assert m.stop("node-0", timeout=40) == 0, m.log_tail("node-0")
    return m


def run_node(m: LocalMesh) -> subprocess.CompletedProcess:
    """`fednode run` once more; the caller expects it to refuse (it would otherwise serve forever)."""
    node = m.node("node-0")
    return subprocess.run([sys.executable, "-m", "fednode", "run", "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(out: subprocess.CompletedProcess) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("fednode: error: ")]
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


def test_a_node_whose_every_checkpoint_is_damaged_refuses_to_start(stopped_node, tmp_path):
    data_dir = stopped_node.node("node-0").data_dir
    ckpt = data_dir / "checkpoints"
    saved = {p: p.read_bytes() for p in ckpt.iterdir()}
    try:
        for path in saved:
            path.write_bytes(saved[path][:200])
        out = run_node(stopped_node)
        assert out.returncode == ExitCode.STORE, out.stderr[-3000:]
        line = one_error_line(out)
        assert "no checkpoint" in line and str(ckpt) in line and "restore the data dir from backup" in line
        # every damaged file is named, with why, before the refusal
        journal = Journal.open(data_dir / "journal.db")
        names = [r.checkpoint for r in journal.rounds()]
        journal.close()
        for name in names:
            assert f"{ckpt / name} is corrupt or truncated" in out.stderr
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "zeroed_page"])
def test_a_node_with_a_damaged_journal_refuses_to_start_with_one_line(stopped_node, damage):
    path = stopped_node.node("node-0").data_dir / "journal.db"
    assert not Path(f"{path}-wal").exists() or Path(f"{path}-wal").stat().st_size == 0  # drained: all in the db
    saved = path.read_bytes()
    try:
        if damage == "garbage":
            path.write_bytes(os.urandom(len(saved)))
        elif damage == "truncated":
            path.write_bytes(saved[: len(saved) // 2])
        else:  # one zeroed page in the middle of the b-trees
            page = 4096
            path.write_bytes(saved[:page] + bytes(page) + saved[2 * page:])
        out = run_node(stopped_node)
        assert out.returncode == ExitCode.STORE, out.stderr[-3000:]
        line = one_error_line(out)
        assert f"journal {path}" in line and ("corrupt" in line or "malformed" in line), line
        assert "restore the data dir from backup" in line
    finally:
        path.write_bytes(saved)
