"""Round checkpoints as safetensors files, written atomically and verified by SHA-256 on load.

The journal stores each checkpoint's hash, so a file damaged after the fact (bit rot, a torn
copy, a half-restored backup) is detected and the node falls back to an older round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from fednode.errors import StoreError
from fednode.store import atomic
from fednode.store.journal import Journal, RoundRecord

log = logging.getLogger(__name__)

_ROUND_FILE = re.compile(r"round-\d{8,}(\.shared)?\.safetensors")
_TMP_FILE = re.compile(r"\..+\.tmp-(\d+)")


def checkpoint_name(round: int) -> str:
    return f"round-{round:08d}.safetensors"


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detach, make contiguous, and clone tensors sharing storage (tied weights): safetensors refuses
    aliased tensors, and each name must get its own bytes so it loads back independently."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[torch.device, int]] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else 0
        if ptr != 0:
            key = (t.device, ptr)
            if key in seen:
                t = t.clone(memory_format=torch.contiguous_format)
            else:
                seen.add(key)
        out[name] = t
    return out


def shared_name(checkpoint: str) -> str:
    """The file beside a round's checkpoint that holds only what may travel (served by FetchState)."""
    return checkpoint.removesuffix(".safetensors") + ".shared.safetensors"


def write_shared_checkpoint(directory: Path, round: int, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str]) -> tuple[str, str]:
    return save_checkpoint(directory, round, tensors, metadata, name=shared_name(checkpoint_name(round)))


def save_checkpoint(
    directory: Path, round: int, tensors: dict[str, torch.Tensor], metadata: dict[str, str], *,
    name: str | None = None,
) -> tuple[str, str]:
    """Durably write `round-{round:08d}.safetensors`; return (file name, sha256 hex) for the journal."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise atomic.os_error_to_store(err, directory, "create checkpoint directory") from err
    try:
        data = _st_save(_prepare(tensors), metadata=dict(metadata))
    except (ValueError, RuntimeError, TypeError, SafetensorError) as err:
        raise StoreError(
            f"cannot serialize round {round} checkpoint ({err}): pass a dict of dense tensors "
            "and str->str metadata"
        ) from err
    name = name or checkpoint_name(round)
    sha = atomic.write_atomic(directory / name, data)
    return name, sha


def _read_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_checkpoint(
    path: Path, expected_sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load (tensors, metadata), verifying the bytes that are parsed against `expected_sha256`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise StoreError(
            f"checkpoint {path} is missing: restore it from backup or let the node fetch state from a peer"
        ) from err
    except OSError as err:
        raise atomic.os_error_to_store(err, path, "read checkpoint") from err
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.lower():
            raise StoreError(
                f"checkpoint {path} is corrupt or truncated (sha256 {actual[:16]}..., journal expects "
                f"{expected_sha256[:16]}..., {len(data)} bytes): it cannot be used; delete it or restore it"
            )
    try:
        tensors = _st_load(data)
        metadata = _read_metadata(data)
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as err:
        raise StoreError(
            f"checkpoint {path} is corrupt or truncated ({err}; {len(data)} bytes): it cannot be used; "
            "delete it or restore it"
        ) from err
    return tensors, metadata


def prune_checkpoints(directory: Path, keep: set[str]) -> int:
    """Remove `round-*.safetensors` not in `keep` and temp files left by crashed writers.

    Temp files of this process are skipped: they may belong to a write still in progress.
    """
    directory = Path(directory)
    own_pid = os.getpid()
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    except OSError as err:
        raise atomic.os_error_to_store(err, directory, "list checkpoint directory") from err
    for entry in entries:
        name = entry.name
        tmp = _TMP_FILE.fullmatch(name)
        if tmp is not None:
            if int(tmp.group(1)) == own_pid:
                continue
        elif not (_ROUND_FILE.fullmatch(name) and name not in keep):
            continue
        try:
            os.unlink(entry.path)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise atomic.os_error_to_store(err, Path(entry.path), "remove old checkpoint") from err
        removed += 1
    if removed:
        try:
            atomic.fsync_dir(directory)
        except OSError as err:
            raise atomic.os_error_to_store(err, directory, "fsync directory") from err
    return removed


def latest_good_round(
    journal: Journal, directory: Path
) -> tuple[RoundRecord, dict[str, torch.Tensor], dict[str, str]] | None:
    """Newest committed round whose checkpoint loads and matches its hash, with its contents.

    Bad rounds are skipped with a warning. None when there are no rounds or none is usable
    (the caller then starts fresh or fetches state from a peer).
    """
    directory = Path(directory)
    for rec in reversed(journal.rounds()):
        try:
            tensors, metadata = load_checkpoint(directory / rec.checkpoint, rec.checkpoint_sha256)
        except StoreError as err:
            log.warning("skipping round %d: %s", rec.round, err)
            continue
        return rec, tensors, metadata
    return None
