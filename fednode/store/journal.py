"""The node's durable journal: committed rounds, known peers, seen message ids, epochs and meta.

SQLite in WAL mode with synchronous=FULL: a commit that returned survives power loss, and a crash
mid-transaction leaves the previous state. A committed round only ever references a checkpoint
that was already durably written (the caller saves the checkpoint first, then commits).
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from fednode.errors import StoreError
from fednode.store import atomic

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY,
    epoch INTEGER NOT NULL,
    level INTEGER NOT NULL,
    checkpoint TEXT NOT NULL,
    checkpoint_sha256 TEXT NOT NULL,
    loss_before REAL,  -- NULL = not measured (SQLite stores NaN as NULL)
    loss_after REAL,
    tokens INTEGER NOT NULL,
    bytes_sent INTEGER NOT NULL,
    bytes_received INTEGER NOT NULL,
    merged_from TEXT NOT NULL,
    source TEXT NOT NULL,
    committed_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    node_id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    incarnation INTEGER NOT NULL,
    last_seen_unix_ms INTEGER NOT NULL,
    hello BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS seen_messages (
    sender TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    round INTEGER NOT NULL,
    message_id BLOB NOT NULL,
    PRIMARY KEY (sender, epoch, round, message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sender_high (
    sender TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    round INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS epochs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    epoch INTEGER NOT NULL,
    level INTEGER NOT NULL,
    state TEXT NOT NULL,
    detail_json TEXT NOT NULL,
    recorded_unix_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_ROUND_COLS = (
    "round, epoch, level, checkpoint, checkpoint_sha256, loss_before, loss_after, tokens, "
    "bytes_sent, bytes_received, merged_from, source, committed_unix_ms"
)

_RESTORE_FIX = "restore the data dir from backup or move it aside to start fresh"


@dataclass
class RoundRecord:
    """One committed round; `checkpoint` is a file name relative to the checkpoint dir."""

    round: int
    epoch: int
    level: int
    checkpoint: str
    checkpoint_sha256: str
    loss_before: float
    loss_after: float
    tokens: int
    bytes_sent: int
    bytes_received: int
    merged_from: list[str]
    source: str  # "local" | "fetched:<peer>"
    committed_unix_ms: int


def _row_to_round(row: tuple[Any, ...]) -> RoundRecord:
    values = list(row)
    values[10] = json.loads(values[10])
    for i in (5, 6):  # loss columns: NULL means "not measured" (e.g. a fetched state)
        values[i] = math.nan if values[i] is None else values[i]
    return RoundRecord(*values)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Journal:
    """One SQLite connection guarded by a lock: safe from the event loop plus `asyncio.to_thread`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, replay_window_rounds: int):
        self.path = path
        self.replay_window_rounds = replay_window_rounds
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, replay_window_rounds: int = 2) -> Journal:
        """Open (creating if needed) and verify the journal; refuse corrupt or newer-schema files."""
        path = Path(path)
        if replay_window_rounds < 0:
            raise StoreError(f"replay_window_rounds must be >= 0, got {replay_window_rounds}: fix the config")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise atomic.os_error_to_store(err, path.parent, "create journal directory") from err
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as err:
            raise _sqlite_to_store(err, path, "open") from err
        try:
            cls._init(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(path, conn, replay_window_rounds)

    @staticmethod
    def _init(conn: sqlite3.Connection, path: Path) -> None:
        try:
            # The first read of the header happens here: garbage files fail with "not a database".
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.Error as err:
            raise _sqlite_to_store(err, path, "open") from err
        if problems != ["ok"]:
            lines = [ln.strip() for row in problems for ln in str(row).splitlines()]
            detail = "; ".join([ln for ln in lines if ln and not ln.startswith("***")][:3])
            raise StoreError(f"journal {path} is corrupt (quick_check: {detail}): {_RESTORE_FIX}")
        if str(mode).lower() != "wal":
            raise StoreError(
                f"journal {path} could not switch to WAL mode (got {mode!r}): "
                "put the data dir on a local filesystem that supports shared memory"
            )
        try:
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                row = conn.execute("SELECT version FROM schema_version WHERE id = 1").fetchone()
                if row is None:
                    conn.execute("INSERT INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,))
                elif row[0] > SCHEMA_VERSION:
                    raise StoreError(
                        f"journal {path} has schema version {row[0]}, newer than this fednode "
                        f"supports ({SCHEMA_VERSION}): upgrade fednode or use a different data dir"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise _sqlite_to_store(err, path, "initialise") from err

    def close(self) -> None:
        """Close the connection (checkpoints the WAL); safe to call twice."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                finally:
                    self._conn = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @contextmanager
    def _locked(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise StoreError(f"journal {self.path} is closed: open it again before {action}")
            try:
                yield self._conn
            except sqlite3.Error as err:
                raise _sqlite_to_store(err, self.path, action) from err

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT under the lock; rolls back on any exception."""
        with self._locked(action) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # ---- rounds ----------------------------------------------------------------------------

    def commit_round(self, rec: RoundRecord) -> None:
        """Record a round whose checkpoint is already durable; rounds only move forward."""
        name = rec.checkpoint
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise StoreError(
                f"round {rec.round} checkpoint {name!r} is not a plain file name: "
                "pass the name relative to the checkpoint dir"
            )
        with self._transaction("commit round") as conn:
            last = conn.execute("SELECT MAX(round) FROM rounds").fetchone()[0]
            if last is not None and rec.round <= last:
                raise StoreError(
                    f"refusing to commit round {rec.round} to journal {self.path}: round {last} is "
                    "already committed and rounds only move forward (committed rounds never change)"
                )
            conn.execute(
                f"INSERT INTO rounds ({_ROUND_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.round,
                    rec.epoch,
                    rec.level,
                    rec.checkpoint,
                    rec.checkpoint_sha256,
                    float(rec.loss_before),
                    float(rec.loss_after),
                    rec.tokens,
                    rec.bytes_sent,
                    rec.bytes_received,
                    json.dumps(list(rec.merged_from)),
                    rec.source,
                    rec.committed_unix_ms,
                ),
            )
            atomic.crash_point("journal.round_inserted")
        atomic.crash_point("journal.round_committed")

    def last_round(self) -> RoundRecord | None:
        with self._locked("read rounds") as conn:
            row = conn.execute(f"SELECT {_ROUND_COLS} FROM rounds ORDER BY round DESC LIMIT 1").fetchone()
        return None if row is None else _row_to_round(row)

    def rounds(self) -> list[RoundRecord]:
        """All committed rounds, ascending."""
        with self._locked("read rounds") as conn:
            rows = conn.execute(f"SELECT {_ROUND_COLS} FROM rounds ORDER BY round ASC").fetchall()
        return [_row_to_round(r) for r in rows]

    def round(self, n: int) -> RoundRecord | None:
        with self._locked("read rounds") as conn:
            row = conn.execute(f"SELECT {_ROUND_COLS} FROM rounds WHERE round = ?", (n,)).fetchone()
        return None if row is None else _row_to_round(row)

    # ---- peers -----------------------------------------------------------------------------

    def upsert_peer(
        self, node_id: str, address: str, incarnation: int, last_seen_unix_ms: int, hello: bytes
    ) -> None:
        """Remember a peer so a restarted node can re-seed membership."""
        with self._transaction("record peer") as conn:
            conn.execute(
                "INSERT INTO peers (node_id, address, incarnation, last_seen_unix_ms, hello) "
                "VALUES (?,?,?,?,?) ON CONFLICT(node_id) DO UPDATE SET address = excluded.address, "
                "incarnation = excluded.incarnation, last_seen_unix_ms = excluded.last_seen_unix_ms, "
                "hello = excluded.hello",
                (node_id, address, incarnation, last_seen_unix_ms, bytes(hello)),
            )

    def peers(self) -> list[dict[str, Any]]:
        """Known peers, most recently seen first."""
        with self._locked("read peers") as conn:
            rows = conn.execute(
                "SELECT node_id, address, incarnation, last_seen_unix_ms, hello FROM peers "
                "ORDER BY last_seen_unix_ms DESC, node_id"
            ).fetchall()
        keys = ("node_id", "address", "incarnation", "last_seen_unix_ms", "hello")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ---- replay protection -----------------------------------------------------------------

    def accept_message(self, sender: str, epoch: int, round: int, message_id: bytes) -> bool:
        """Record a message and return True, or False if it is a duplicate or too old to check.

        "Too old" means (epoch, round) < (high_epoch, high_round - replay_window_rounds), compared as
        tuples, where (high_epoch, high_round) is the highest accepted from this sender. Ids older
        than that floor are pruned: anything there is refused as stale, so it needs no dedup entry.
        """
        mid = bytes(message_id)
        with self._transaction("check message replay") as conn:
            high = conn.execute("SELECT epoch, round FROM sender_high WHERE sender = ?", (sender,)).fetchone()
            if high is not None and (epoch, round) < (high[0], high[1] - self.replay_window_rounds):
                return False
            cur = conn.execute(
                "INSERT OR IGNORE INTO seen_messages (sender, epoch, round, message_id) VALUES (?,?,?,?)",
                (sender, epoch, round, mid),
            )
            if cur.rowcount == 0:
                return False
            if high is None or (epoch, round) > (high[0], high[1]):
                conn.execute(
                    "INSERT INTO sender_high (sender, epoch, round) VALUES (?,?,?) ON CONFLICT(sender) "
                    "DO UPDATE SET epoch = excluded.epoch, round = excluded.round",
                    (sender, epoch, round),
                )
                floor_round = round - self.replay_window_rounds
                conn.execute(
                    "DELETE FROM seen_messages WHERE sender = ? AND (epoch < ? OR (epoch = ? AND round < ?))",
                    (sender, epoch, epoch, floor_round),
                )
            return True

    # ---- epochs ----------------------------------------------------------------------------

    def record_epoch(self, epoch: int, level: int, state: str, detail_json: str = "{}") -> None:
        """Append an epoch state change; epochs never go backwards (same epoch, new state is fine)."""
        try:
            json.loads(detail_json)
        except ValueError as err:
            raise StoreError(f"epoch {epoch} detail is not valid JSON ({err}): pass a JSON string") from err
        with self._transaction("record epoch") as conn:
            last = conn.execute("SELECT MAX(epoch) FROM epochs").fetchone()[0]
            if last is not None and epoch < last:
                raise StoreError(
                    f"refusing to record epoch {epoch} in journal {self.path}: epoch {last} is already "
                    "recorded and epochs only move forward"
                )
            conn.execute(
                "INSERT INTO epochs (epoch, level, state, detail_json, recorded_unix_ms) VALUES (?,?,?,?,?)",
                (epoch, level, state, detail_json, _now_ms()),
            )

    def last_epoch(self) -> tuple[int, int, str] | None:
        """(epoch, level, state) of the most recent record, or None."""
        with self._locked("read epochs") as conn:
            row = conn.execute("SELECT epoch, level, state FROM epochs ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (row[0], row[1], row[2])

    # ---- meta ------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._locked("read meta") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        with self._transaction("write meta") as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def next_incarnation(self) -> int:
        """Atomically bump and return the node's incarnation (1 on first start)."""
        with self._transaction("bump incarnation") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
            value = (int(row[0]) if row is not None else 0) + 1
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('incarnation', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(value),),
            )
        return value


def _sqlite_to_store(err: sqlite3.Error, path: Path, action: str) -> StoreError:
    """One-line StoreError for a failed journal operation, with the likely fix."""
    text = str(err)
    low = text.lower()
    if "malformed" in low or "not a database" in low:
        return StoreError(f"journal {path} is corrupt ({text}): {_RESTORE_FIX}")
    if "full" in low:
        fix = "the disk is full: free space in the data dir"
    elif "readonly" in low or "read-only" in low:
        fix = "the journal is read-only: make the data dir and journal files writable by the fednode user"
    elif "locked" in low or "busy" in low:
        fix = "another process holds the journal: stop the other fednode using this data dir"
    elif "unable to open" in low:
        fix = "check the data dir exists and is writable by the fednode user"
    else:
        fix = "check the disk and the data dir"
    return StoreError(f"journal {path}: cannot {action} ({text}): {fix}")
