"""Crash safety of the store: a writer process SIGKILLs itself at each write point, then we recover.

The child writes a checkpoint and commits its round in a loop (as the daemon does) and kills itself
from a hook installed with `fednode.store.atomic.set_crash_hook` at one point of one round. For the
point "atomic.written" (data written, not yet fsynced) it first truncates the temp file to half,
standing in for the unsynced pages a power cut loses. The parent then reopens everything like a
restarted daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fednode.store import atomic
from fednode.store.checkpoint import latest_good_round, load_checkpoint, prune_checkpoints, save_checkpoint
from fednode.store.journal import Journal, RoundRecord

CHILD = r"""
import os, signal, sys
from pathlib import Path

data_dir, point, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[4]
crash_round, last = int(sys.argv[3]), int(sys.argv[5])
ckpt = data_dir / "ckpt"

from fednode.store import atomic
from fednode.store.journal import Journal, RoundRecord

if mode == "torch":
    import torch
    from fednode.store.checkpoint import save_checkpoint
else:
    import numpy as np
    from safetensors.numpy import save as np_save
    assert "torch" not in sys.modules, "journal/atomic must not import torch"

current = {"round": 0}

def hook(name):
    if name != point or current["round"] != crash_round:
        return
    if name == "atomic.written":
        tmp = atomic.tmp_path_for(ckpt / f"round-{crash_round:08d}.safetensors")
        os.truncate(tmp, tmp.stat().st_size // 2)
    os.kill(os.getpid(), signal.SIGKILL)

atomic.set_crash_hook(hook)
journal = Journal.open(data_dir / "journal.db")
prev = journal.last_round()
for n in range((prev.round if prev else 0) + 1, last + 1):
    current["round"] = n
    if mode == "torch":
        w = torch.full((256,), float(n))
        name, sha = save_checkpoint(ckpt, n, {"w": w, "tied": w}, {"round": str(n)})
    else:
        ckpt.mkdir(exist_ok=True)
        name = f"round-{n:08d}.safetensors"
        data = np_save({"w": np.full((256,), n, np.float32), "tied": np.full((256,), n, np.float32)},
                       {"round": str(n)})
        sha = atomic.write_atomic(ckpt / name, data)
    journal.commit_round(RoundRecord(
        round=n, epoch=0, level=1, checkpoint=name, checkpoint_sha256=sha, loss_before=1.0,
        loss_after=0.5, tokens=n, bytes_sent=0, bytes_received=0, merged_from=[], source="local",
        committed_unix_ms=n))
journal.close()
print("finished", flush=True)
"""

LAST = 5


def run_child(
    data_dir: Path, point: str, crash_round: int, mode: str = "numpy"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(data_dir), point, str(crash_round), mode, str(LAST)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_recovered(data_dir: Path, expected_last: int) -> list[RoundRecord]:
    """Every committed round is contiguous, intact and loadable; latest_good_round agrees."""
    ckpt = data_dir / "ckpt"
    with Journal.open(data_dir / "journal.db") as j:
        rounds = j.rounds()
        assert [r.round for r in rounds] == list(range(1, expected_last + 1))
        for r in rounds:
            tensors, meta = load_checkpoint(ckpt / r.checkpoint, r.checkpoint_sha256)
            assert meta == {"round": str(r.round)}
            assert torch.equal(tensors["w"], torch.full((256,), float(r.round)))
            assert torch.equal(tensors["tied"], tensors["w"])
        good = latest_good_round(j, ckpt)
        if expected_last:
            assert good is not None and good[0].round == expected_last
        else:
            assert good is None
    return rounds


# point, round the crash happens in, rounds committed afterwards, leftovers expected in ckpt/
SCENARIOS = [
    ("atomic.written", 3, 2, "tmp"),  # after write, before fsync (tail of the data lost)
    ("atomic.fsynced", 3, 2, "tmp"),  # after fsync, before rename
    ("atomic.renamed", 3, 2, "orphan"),  # after rename, before the directory fsync
    ("atomic.dir_fsynced", 3, 2, "orphan"),  # checkpoint durable, before the journal commit
    ("journal.round_inserted", 3, 2, "orphan"),  # mid-transaction
    ("journal.round_committed", 3, 3, None),  # right after the commit
    ("atomic.written", 1, 0, "tmp"),  # before anything was ever committed
]


@pytest.mark.parametrize(("point", "crash_round", "committed", "leftover"), SCENARIOS)
def test_crash_at_each_write_point(
    tmp_path: Path, point: str, crash_round: int, committed: int, leftover: str | None
) -> None:
    proc = run_child(tmp_path, point, crash_round)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "finished" not in proc.stdout

    ckpt = tmp_path / "ckpt"
    crashed_name = f"round-{crash_round:08d}.safetensors"
    tmp_name = f".{crashed_name}.tmp-"
    names = {p.name for p in ckpt.iterdir()}
    tmps = {n for n in names if n.startswith(tmp_name)}
    if leftover == "tmp":
        assert len(tmps) == 1 and crashed_name not in names
    elif leftover == "orphan":
        assert not tmps and crashed_name in names  # on disk, but no committed round points at it
    else:
        assert not tmps

    rounds = check_recovered(tmp_path, committed)
    if committed < crash_round:  # the crashed round's file, whole or partial, is never referenced
        assert crashed_name not in {r.checkpoint for r in rounds}

    # A restarted writer carries on over the leftovers (it ignores other pids' temp files and
    # atomically replaces an orphaned checkpoint), then pruning clears what nothing references.
    resumed = run_child(tmp_path, "none", 0)
    assert resumed.returncode == 0 and "finished" in resumed.stdout, resumed.stderr
    rounds = check_recovered(tmp_path, LAST)
    assert {n for n in (p.name for p in ckpt.iterdir()) if ".tmp-" in n} == tmps
    keep = {r.checkpoint for r in rounds}
    assert prune_checkpoints(ckpt, keep) == len(tmps)
    assert {p.name for p in ckpt.iterdir()} == keep


def test_crash_in_save_checkpoint_with_torch(tmp_path: Path) -> None:
    """The same, through the real save_checkpoint (torch tensors, tied pair) in the child."""
    proc = run_child(tmp_path, "atomic.written", 2, mode="torch")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    check_recovered(tmp_path, 1)
    with Journal.open(tmp_path / "journal.db") as j:
        keep = {r.checkpoint for r in j.rounds()}
    assert prune_checkpoints(tmp_path / "ckpt", keep) == 1
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == keep


def test_write_order_is_fsync_rename_dirsync_then_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILL cannot lose page cache, so also check the ordering power-loss safety relies on:
    file fsync -> rename -> directory fsync -> journal commit."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: os.PathLike, dst: os.PathLike) -> None:
        events.append(("replace", f"{Path(src).name}->{Path(dst).name}"))
        real_replace(src, dst)

    with Journal.open(tmp_path / "journal.db") as j:
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        ckpt = tmp_path / "ckpt"
        ckpt.mkdir()
        with atomic.crash_hook(lambda name: events.append(("point", name))):
            name, sha = save_checkpoint(ckpt, 1, {"w": torch.ones(4)}, {})
            j.commit_round(RoundRecord(1, 0, 1, name, sha, 1.0, 0.5, 1, 0, 0, [], "local", 1))
    tmp = atomic.tmp_path_for(ckpt / name)
    assert events == [
        ("point", "atomic.written"),
        ("fsync", str(tmp)),
        ("point", "atomic.fsynced"),
        ("replace", f"{tmp.name}->{name}"),
        ("point", "atomic.renamed"),
        ("fsync", str(ckpt)),
        ("point", "atomic.dir_fsynced"),
        ("point", "journal.round_inserted"),
        ("point", "journal.round_committed"),
    ]
    assert [name for kind, name in events if kind == "point"] == list(atomic.CRASH_POINTS)
    events.clear()
    save_checkpoint(ckpt, 2, {"w": torch.ones(4)}, {})  # the hook is gone again
    assert events and not [e for e in events if e[0] == "point"]
