"""Error types shared by every layer.

Each error carries a one-line message that names the problem and the fix. Peer-facing errors
also carry a protocol `Reason` so the gRPC layer can answer with a typed status.
"""

from __future__ import annotations

import enum

from fednode.v1 import peer_pb2


class ExitCode(enum.IntEnum):
    """Numbered process exit codes (documented in docs/operations.md)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    CONFIG = 3
    PKI = 4
    STORE = 5
    NETWORK = 6
    NOT_RUNNING = 7
    INTERRUPTED = 130


Reason = peer_pb2.Reason  # the protocol outcome enum (values are ints, names via Reason.Name)


def reason_name(reason: int) -> str:
    return peer_pb2.Reason.Name(reason)


class FednodeError(Exception):
    """Base class: `str(err)` is a one-line message naming the problem and the fix."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(FednodeError):
    exit_code = ExitCode.CONFIG


class PkiError(FednodeError):
    exit_code = ExitCode.PKI


class StoreError(FednodeError):
    exit_code = ExitCode.STORE


class NetworkError(FednodeError):
    exit_code = ExitCode.NETWORK


class ProtocolError(FednodeError):
    """A peer sent something we refuse; `reason` is the typed protocol outcome. `revocation_list`
    (DER), when set, travels back with the refusal: a revoked caller learns, verifiably (the list
    is CA-signed), why it was refused."""

    def __init__(self, reason: int, detail: str, *, revocation_list: bytes | None = None):
        super().__init__(f"{reason_name(reason)}: {detail}")
        self.reason = reason
        self.detail = detail
        self.revocation_list: bytes | None = revocation_list
