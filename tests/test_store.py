"""Durable store: atomic writes, the SQLite journal and safetensors checkpoints (real files, real fsync)."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import sqlite3
import threading
from pathlib import Path

import pytest
import torch

from fednode.errors import StoreError
from fednode.store import atomic
from fednode.store.atomic import create_atomic, fsync_dir, sha256_file, write_atomic
from fednode.store.checkpoint import (
    latest_good_round,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from fednode.store.journal import SCHEMA_VERSION, Journal, RoundRecord


def rec(n: int, *, checkpoint: str | None = None, sha: str = "0" * 64, epoch: int = 0) -> RoundRecord:
    return RoundRecord(
        round=n,
        epoch=epoch,
        level=1,
        checkpoint=checkpoint or f"round-{n:08d}.safetensors",
        checkpoint_sha256=sha,
        loss_before=2.5,
        loss_after=2.25,
        tokens=1000 * n,
        bytes_sent=10 * n,
        bytes_received=20 * n,
        merged_from=["peer-a", "peer-b"],
        source="local" if n % 2 else "fetched:peer-a",
        committed_unix_ms=1_700_000_000_000 + n,
    )


def no_tmp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name]


# ---- atomic --------------------------------------------------------------------------------------


def test_write_atomic_bytes_and_chunks(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    data = os.urandom(3 << 20) + b"tail"
    sha = write_atomic(target, data)
    assert sha == hashlib.sha256(data).hexdigest() == sha256_file(target)
    assert target.read_bytes() == data
    assert no_tmp_files(tmp_path)
    assert (target.stat().st_mode & 0o777) == 0o644

    chunks = [b"abc", memoryview(b"defgh"), bytearray(b"ij")]
    sha = write_atomic(target, iter(chunks), mode=0o600)
    assert target.read_bytes() == b"abcdefghij"
    assert sha == hashlib.sha256(b"abcdefghij").hexdigest()
    assert (target.stat().st_mode & 0o777) == 0o600
    assert no_tmp_files(tmp_path)
    fsync_dir(tmp_path)


def test_write_atomic_failure_leaves_target_and_no_tmp(tmp_path: Path) -> None:
    target = tmp_path / "blob.bin"
    write_atomic(target, b"old contents")

    def chunks():
        yield b"partial new contents"
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_atomic(target, chunks())
    assert target.read_bytes() == b"old contents"
    assert no_tmp_files(tmp_path)


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"), (errno.EACCES, "permission denied")],
)
def test_write_atomic_os_errors_become_store_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    target = tmp_path / "blob.bin"
    write_atomic(target, b"old contents")
    real_write = os.write
    calls = []

    def failing_write(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) > 1:
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(atomic.os, "write", failing_write)
    with pytest.raises(StoreError) as info:
        write_atomic(target, [b"a" * 10, b"b" * 10])
    message = str(info.value)
    assert str(target) in message and words in message and "\n" not in message
    monkeypatch.undo()
    assert target.read_bytes() == b"old contents"
    assert no_tmp_files(tmp_path)


def test_write_atomic_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="missing"):
        write_atomic(tmp_path / "nope" / "blob.bin", b"x")


def test_create_atomic_sets_the_exact_mode_and_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "payload.key"
    old_umask = os.umask(0o077)  # the mode is exact whatever the umask
    try:
        assert create_atomic(target, b"first", mode=0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"first" and (target.stat().st_mode & 0o777) == 0o640
    assert not create_atomic(target, b"second", mode=0o600)  # exists: left alone
    assert target.read_bytes() == b"first" and (target.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["payload.key"]


def test_create_atomic_concurrent_creators_one_wins(tmp_path: Path) -> None:
    target = tmp_path / "once.bin"
    barrier = threading.Barrier(8)
    results: dict[int, bool] = {}

    def create(i: int) -> None:
        barrier.wait()
        results[i] = create_atomic(target, f"writer {i}".encode(), mode=0o600)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, created in results.items() if created]
    assert len(winners) == 1 and target.read_bytes() == f"writer {winners[0]}".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["once.bin"]


def test_create_atomic_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="missing") as info:
        create_atomic(tmp_path / "nope" / "blob.bin", b"x")
    assert isinstance(info.value.__cause__, FileNotFoundError)  # callers can name the OS reason


def test_sha256_file_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="nope"):
        sha256_file(tmp_path / "nope")


# ---- journal: rounds, reopen, WAL ----------------------------------------------------------------


def test_journal_rounds_roundtrip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "journal.db"  # parent dirs are created
    with Journal.open(path) as j:
        assert j.last_round() is None and j.rounds() == [] and j.round(1) is None
        for n in (1, 2, 5):
            j.commit_round(rec(n))
        assert j.last_round() == rec(5)
        assert j.round(2) == rec(2)
        assert j.round(3) is None
        assert [r.round for r in j.rounds()] == [1, 2, 5]
        j.upsert_peer("peer-a", "10.0.0.1:7000", 3, 1000, b"\x00hello")
        j.upsert_peer("peer-b", "10.0.0.2:7000", 1, 2000, b"hi")
        j.upsert_peer("peer-a", "10.0.0.9:7000", 4, 3000, b"hello2")
        j.record_epoch(1, 2, "proposed", '{"x": 1}')
        j.record_epoch(1, 2, "committed")
        j.set_meta("node_id", "abc")
        assert j.next_incarnation() == 1
        assert j.next_incarnation() == 2
        assert j.accept_message("peer-a", 1, 5, b"m1")
    with pytest.raises(StoreError, match="closed"):
        j.rounds()
    j.close()  # idempotent

    with Journal.open(path) as j:
        assert j.rounds() == [rec(1), rec(2), rec(5)]
        assert j.rounds()[0].merged_from == ["peer-a", "peer-b"]
        assert j.rounds()[1].source == "fetched:peer-a"
        peers = j.peers()
        assert [p["node_id"] for p in peers] == ["peer-a", "peer-b"]
        assert peers[0] == {
            "node_id": "peer-a",
            "address": "10.0.0.9:7000",
            "incarnation": 4,
            "last_seen_unix_ms": 3000,
            "hello": b"hello2",
        }
        assert j.last_epoch() == (1, 2, "committed")
        assert j.get_meta("node_id") == "abc" and j.get_meta("missing") is None
        assert j.next_incarnation() == 3
        assert not j.accept_message("peer-a", 1, 5, b"m1")  # replay state survives restart


def test_journal_refuses_non_increasing_rounds(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as j:
        j.commit_round(rec(3))
        for n in (3, 2):
            with pytest.raises(StoreError, match="only move forward"):
                j.commit_round(rec(n, sha="f" * 64))
        assert j.rounds() == [rec(3)]  # the committed round did not change
        j.commit_round(rec(4))  # the refused transaction did not wedge the connection
        assert j.last_round() == rec(4)
        with pytest.raises(StoreError, match="plain file name"):
            j.commit_round(rec(5, checkpoint="../evil.safetensors"))


def test_journal_wal_mode_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    with Journal.open(path) as j:
        j.commit_round(rec(1))
        assert (tmp_path / "journal.db-wal").exists()
        # check through an independent connection that the file itself is in WAL mode
        other = sqlite3.connect(path)
        try:
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 1
        finally:
            other.close()
        assert j._conn is not None
        assert j._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_journal_epochs_and_meta(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as j:
        assert j.last_epoch() is None
        j.record_epoch(2, 1, "proposed")
        j.record_epoch(3, 2, "proposed", '{"members": ["a"]}')
        assert j.last_epoch() == (3, 2, "proposed")
        with pytest.raises(StoreError, match="epochs only move forward"):
            j.record_epoch(2, 1, "committed")
        with pytest.raises(StoreError, match="not valid JSON"):
            j.record_epoch(4, 1, "proposed", "{nope")
        assert j.last_epoch() == (3, 2, "proposed")
        j.set_meta("k", "v1")
        j.set_meta("k", "v2")
        assert j.get_meta("k") == "v2"


def test_next_incarnation_is_atomic_across_threads(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db") as j:
        got: list[int] = []
        lock = threading.Lock()

        def bump() -> None:
            for _ in range(20):
                v = j.next_incarnation()
                with lock:
                    got.append(v)

        threads = [threading.Thread(target=bump) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(1, 81))


# ---- journal: replay protection ------------------------------------------------------------------


def test_accept_message_duplicates_and_stale(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db", replay_window_rounds=2) as j:
        assert j.accept_message("a", 0, 10, b"m1")
        assert not j.accept_message("a", 0, 10, b"m1")  # exact duplicate
        assert j.accept_message("a", 0, 10, b"m2")  # same round, different id
        assert j.accept_message("b", 0, 10, b"m1")  # same id from another sender
        assert j.accept_message("a", 0, 8, b"late")  # inside the window (10 - 2)
        assert not j.accept_message("a", 0, 8, b"late")
        assert not j.accept_message("a", 0, 7, b"old")  # below the window: stale
        assert j.accept_message("a", 1, 0, b"new-epoch")  # a higher epoch moves the high mark
        assert not j.accept_message("a", 0, 10, b"m3")  # older epoch is now stale
        assert j.accept_message("b", 0, 9, b"m9")  # senders are independent


def test_accept_message_window_prunes_table(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db", replay_window_rounds=2) as j:
        for r in range(1, 21):
            for k in range(3):
                assert j.accept_message("a", 0, r, bytes([r, k]))
            assert j.accept_message("b", 0, r, b"x")
        assert j._conn is not None
        rows = j._conn.execute("SELECT sender, round FROM seen_messages ORDER BY sender, round").fetchall()
        # only rounds 18..20 (the window) are kept, per sender
        assert rows == [("a", r) for r in (18, 18, 18, 19, 19, 19, 20, 20, 20)] + [
            ("b", 18),
            ("b", 19),
            ("b", 20),
        ]
        assert not j.accept_message("a", 0, 18, bytes([18, 0]))  # kept ids still dedup
        assert not j.accept_message("a", 0, 17, b"fresh-id")  # pruned rounds are stale


def test_accept_message_window_zero(tmp_path: Path) -> None:
    with Journal.open(tmp_path / "journal.db", replay_window_rounds=0) as j:
        assert j.accept_message("a", 0, 5, b"x")
        assert not j.accept_message("a", 0, 4, b"y")
        assert j.accept_message("a", 0, 5, b"y")


# ---- journal: corruption -------------------------------------------------------------------------


def _make_journal(path: Path) -> None:
    """A journal spanning several pages, closed cleanly (WAL checkpointed into the main file)."""
    with Journal.open(path) as j:
        for n in range(1, 6):
            j.commit_round(rec(n))
        for k in range(8):
            j.upsert_peer(f"peer-{k}", f"10.0.0.{k}:7000", 1, k, bytes([k]) * 3000)
    assert not Path(str(path) + "-wal").exists() or Path(str(path) + "-wal").stat().st_size == 0


def test_garbage_journal_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _make_journal(path)
    size = path.stat().st_size
    path.write_bytes(os.urandom(size))
    with pytest.raises(StoreError) as info:
        Journal.open(path)
    message = str(info.value)
    assert "corrupt" in message and str(path) in message and "backup" in message
    assert "\n" not in message


def test_damaged_journal_pages_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _make_journal(path)
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page
    data[2 * page : 4 * page] = b"\xa5" * (2 * page)  # scribble over interior pages, keep the header
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"journal .* is corrupt .*move it aside"):
        Journal.open(path)


def test_quick_check_failure_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    _make_journal(path)
    data = bytearray(path.read_bytes())
    data[32:36] = (3).to_bytes(4, "big")  # header: first freelist trunk page -> a page in use
    data[36:40] = (1).to_bytes(4, "big")  # header: freelist page count
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        Journal.open(path)
    message = str(info.value)
    assert message.startswith(f"journal {path} is corrupt (quick_check: ")
    assert "freelist" in message and "backup" in message and "\n" not in message


def test_non_sqlite_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    path.write_text("this is not a database, it is a text file\n" * 100)
    with pytest.raises(StoreError, match="corrupt"):
        Journal.open(path)


def test_newer_schema_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    Journal.open(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer than this fednode"):
        Journal.open(path)


# ---- checkpoints ---------------------------------------------------------------------------------


def model_like() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    emb = torch.randn(32, 8)
    return {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: shares storage with embed.weight
        "layer.0.w": torch.randn(8, 8).t(),  # non-contiguous
        "layer.0.b": torch.zeros(8, dtype=torch.bfloat16),
        "rows": emb[4:12],  # a view into the tied storage
        "step": torch.tensor(7, dtype=torch.int64),
        "param": torch.nn.Parameter(torch.ones(3)),  # requires grad
    }


def test_checkpoint_roundtrip_with_tied_tensors(tmp_path: Path) -> None:
    tensors = model_like()
    name, sha = save_checkpoint(tmp_path / "ckpt", 3, tensors, {"round": "3", "model": "tiny"})
    assert name == "round-00000003.safetensors"
    path = tmp_path / "ckpt" / name
    assert sha == sha256_file(path)
    assert no_tmp_files(tmp_path / "ckpt")
    loaded, meta = load_checkpoint(path, sha)
    assert meta == {"round": "3", "model": "tiny"}
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value.detach()), key
    # tied names load back as independent tensors with their own bytes
    loaded["embed.weight"].add_(1)
    assert not torch.equal(loaded["embed.weight"], loaded["lm_head.weight"])
    # the caller's tensors were not modified or re-tied
    assert tensors["embed.weight"].data_ptr() == tensors["lm_head.weight"].data_ptr()
    assert load_checkpoint(path)[1] == meta  # without an expected sha


def test_checkpoint_sha_mismatch_and_truncation(tmp_path: Path) -> None:
    name, sha = save_checkpoint(tmp_path, 1, model_like(), {})
    path = tmp_path / name
    data = path.read_bytes()

    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # still parses, but is not what was written
    path.write_bytes(bytes(flipped))
    with pytest.raises(StoreError, match=r"checkpoint .*round-00000001.safetensors is corrupt"):
        load_checkpoint(path, sha)

    for cut in (len(data) - 10, len(data) // 2, 20, 4, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(StoreError, match="corrupt or truncated"):
            load_checkpoint(path, sha)
        with pytest.raises(StoreError, match="corrupt or truncated"):
            load_checkpoint(path)  # parse errors are caught even without a hash

    with pytest.raises(StoreError, match="missing"):
        load_checkpoint(tmp_path / "round-00000009.safetensors", sha)


def test_checkpoint_bad_input_is_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot serialize"):
        save_checkpoint(tmp_path, 1, {"x": torch.zeros(2).to_sparse()}, {})
    assert list(tmp_path.iterdir()) == []


def _commit_checkpoint(j: Journal, directory: Path, n: int) -> RoundRecord:
    name, sha = save_checkpoint(directory, n, {"w": torch.full((4,), float(n))}, {"round": str(n)})
    r = rec(n, checkpoint=name, sha=sha)
    j.commit_round(r)
    return r


def test_latest_good_round_skips_corrupt_newest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    with Journal.open(tmp_path / "journal.db") as j:
        assert latest_good_round(j, ckpt) is None
        for n in (1, 2, 3, 4):
            _commit_checkpoint(j, ckpt, n)
        got = latest_good_round(j, ckpt)
        assert got is not None and got[0].round == 4 and torch.equal(got[1]["w"], torch.full((4,), 4.0))

        newest = ckpt / "round-00000004.safetensors"
        newest.write_bytes(newest.read_bytes()[:-8])  # truncated
        (ckpt / "round-00000003.safetensors").unlink()  # missing
        with caplog.at_level(logging.WARNING, logger="fednode.store.checkpoint"):
            got = latest_good_round(j, ckpt)
        assert got is not None
        record, tensors, meta = got
        assert record.round == 2 and meta == {"round": "2"}
        assert torch.equal(tensors["w"], torch.full((4,), 2.0))
        skipped = [r.getMessage() for r in caplog.records]
        assert len(skipped) == 2
        assert "round 4" in skipped[0] and "corrupt" in skipped[0]
        assert "round 3" in skipped[1] and "missing" in skipped[1]

        for n in (1, 2):
            (ckpt / f"round-{n:08d}.safetensors").unlink()
        assert latest_good_round(j, ckpt) is None


def test_prune_checkpoints(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        save_checkpoint(tmp_path, n, {"w": torch.zeros(2)}, {})
    (tmp_path / ".round-00000004.safetensors.tmp-999999999").write_bytes(b"partial")
    own_tmp = atomic.tmp_path_for(tmp_path / "round-00000005.safetensors")
    own_tmp.write_bytes(b"in progress in this process")
    (tmp_path / "journal.db").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.txt").write_bytes(b"unrelated")

    removed = prune_checkpoints(tmp_path, keep={"round-00000002.safetensors"})
    assert removed == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["round-00000002.safetensors", own_tmp.name, "journal.db", "notes.txt"]
    )
    assert prune_checkpoints(tmp_path, keep={"round-00000002.safetensors"}) == 0
    assert prune_checkpoints(tmp_path / "absent", keep=set()) == 0
