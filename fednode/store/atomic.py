"""Crash-safe file replacement: write a temp file, fsync it, rename it over the target, fsync the dir.

A reader (or a restarted daemon) therefore sees either the old file or the complete new one, never
a torn write, and once `write_atomic` returns the new file survives power loss. `create_atomic` is
the same for a file that must never be replaced once it exists (first writer wins).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from fednode.errors import StoreError

# The store's write points, in the order one checkpoint write and its round commit pass them:
# data written (not yet fsynced), fsynced, renamed into place, directory fsynced, the journal's
# round row inserted (transaction open), committed.
CRASH_POINTS = ("atomic.written", "atomic.fsynced", "atomic.renamed", "atomic.dir_fsynced",
                "journal.round_inserted", "journal.round_committed")
CrashHook = Callable[[str], None]  # called with a point's name; a crash test kills the process there

_crash_hook: CrashHook | None = None  # set only through set_crash_hook; None in production


def set_crash_hook(hook: CrashHook | None) -> CrashHook | None:
    """Install `hook` at the store's write points (CRASH_POINTS), or with None remove it; returns
    the hook it replaces, so a caller can put that back. The only way in: crash tests and the fault
    plan (fednode.transport.faults, only under FEDNODE_FAULTS) use it; production never does."""
    global _crash_hook
    previous, _crash_hook = _crash_hook, hook
    return previous


@contextlib.contextmanager
def crash_hook(hook: CrashHook) -> Iterator[None]:
    """`hook` at the write points for the duration of the block, then whatever was there before."""
    previous = set_crash_hook(hook)
    try:
        yield
    finally:
        set_crash_hook(previous)


def crash_point(name: str) -> None:
    """The store reached write point `name` (one of CRASH_POINTS): the installed hook, if any, runs."""
    if _crash_hook is not None:
        _crash_hook(name)


def tmp_path_for(path: Path, pid: int | None = None) -> Path:
    """The temp name `write_atomic` uses: hidden, next to the target (same filesystem for rename)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


def os_error_to_store(err: OSError, path: Path, action: str) -> StoreError:
    """Turn an OSError into a one-line StoreError that names the path and what to do about it."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "the disk is full: free space (e.g. prune old checkpoints) or move the data dir"
    elif err.errno == errno.EROFS:
        fix = "the filesystem is read-only: remount it read-write or point the data dir elsewhere"
    elif err.errno in (errno.EACCES, errno.EPERM):
        fix = "permission denied: make the data dir writable by the fednode user"
    elif err.errno == errno.ENOENT:
        fix = "a parent directory is missing: create the data dir (or check its path)"
    else:
        fix = "check the disk and the data dir"
    reason = err.strerror or type(err).__name__
    return StoreError(f"cannot {action} {path} ({reason}): {fix}")


def fsync_dir(path: Path) -> None:
    """Make a rename/create/unlink inside `path` durable (the entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as err:
        # Some filesystems (e.g. some network/FUSE ones) refuse fsync on directories.
        if err.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _write_all(fd: int, chunk: bytes | bytearray | memoryview) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_atomic(path: Path, data: bytes | Iterable[bytes | memoryview], mode: int = 0o644) -> str:
    """Atomically replace `path` with `data`; return the SHA-256 hex of what was written.

    The hash is computed while writing, so callers get an integrity stamp without re-reading.
    On any failure the temp file is removed and `path` is left as it was.
    """
    path = Path(path)
    tmp = tmp_path_for(path)
    chunks: Iterable[bytes | bytearray | memoryview]
    chunks = [data] if isinstance(data, bytes | bytearray | memoryview) else data
    digest = hashlib.sha256()
    stage = "write"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # exact mode regardless of umask / a stale tmp file's mode
            for chunk in chunks:
                digest.update(chunk)
                _write_all(fd, chunk)
            crash_point("atomic.written")
            stage = "fsync"
            os.fsync(fd)
        finally:
            os.close(fd)
        crash_point("atomic.fsynced")
        stage = "rename into place"
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise os_error_to_store(err, path, stage) from err
        raise
    crash_point("atomic.renamed")
    try:
        fsync_dir(path.parent)
    except OSError as err:
        raise os_error_to_store(err, path.parent, "fsync directory") from err
    crash_point("atomic.dir_fsynced")
    return digest.hexdigest()


def create_atomic(path: Path, data: bytes, mode: int = 0o644) -> bool:
    """Create `path` holding `data` (exactly `mode`) unless it exists; True if this call created it.

    Never replaces: of concurrent creators (threads or processes) exactly one wins and the others
    get False, the winner's file untouched. The data is written and fsynced under a temp name unique
    to this call, then hard-linked into place, so no reader ever sees a partial file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    stage = "write"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)  # exact mode regardless of umask
            _write_all(fd, data)
            stage = "fsync"
            os.fsync(fd)
        finally:
            os.close(fd)
        stage = "link into place"
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    except OSError as err:
        raise os_error_to_store(err, path, stage) from err
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    try:
        fsync_dir(path.parent)
    except OSError as err:
        raise os_error_to_store(err, path.parent, "fsync directory") from err
    return True


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 hex of a file, read in chunks so multi-GB checkpoints do not need to fit in memory."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(chunk)
            view = memoryview(buf)
            while n := f.readinto(buf):
                digest.update(view[:n])
    except OSError as err:
        raise os_error_to_store(err, Path(path), "read") from err
    return digest.hexdigest()
