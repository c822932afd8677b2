"""Reading what a node did: its journal (read-only, safe while the daemon runs) and its resources."""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from fednode.errors import StoreError
from fednode.store.journal import Journal, RoundRecord


def read_rounds(data_dir: Path) -> list[RoundRecord]:
    """Every committed round of a node, read through a read-only connection (no write lock is
    taken, so a running daemon is never slowed or blocked). Empty when no journal exists yet."""
    path = Path(data_dir) / "journal.db"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False, timeout=10.0)
    journal = Journal(path, conn, replay_window_rounds=2)
    try:
        return journal.rounds()
    except (sqlite3.OperationalError, StoreError):  # created, no schema yet: nothing committed
        return []
    finally:
        journal.close()


@dataclass(frozen=True)
class ResourceSample:
    """One process's footprint: resident memory, open file descriptors, threads."""

    rss_bytes: int
    open_fds: int
    threads: int

    @classmethod
    def of(cls, pid: int) -> ResourceSample:
        proc = psutil.Process(pid)
        with proc.oneshot():
            return cls(proc.memory_info().rss, proc.num_fds(), proc.num_threads())


@dataclass
class NodeReport:
    """What the harness collected from one node at the end of a run."""

    name: str
    status: dict | None
    rounds: list[RoundRecord]
    samples: list[tuple[int, ResourceSample]]  # (committed round, sample)

    def to_dict(self) -> dict:
        return {"name": self.name, "status": self.status, "rounds": [asdict(r) for r in self.rounds],
                "samples": [{"round": r, **asdict(s)} for r, s in self.samples]}
