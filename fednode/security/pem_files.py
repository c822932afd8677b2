"""Key, certificate and revocation-list files on disk: read one with a one-line error that names
the fix, write one through `fednode.store.atomic` (a crash or a concurrent reader never sees half
a key; private keys 0600, certificates and CRLs 0644), warn when a key file is readable by others.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fednode.errors import PkiError
from fednode.store.atomic import write_atomic

log = logging.getLogger(__name__)

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644


def read_file(path: Path, what: str, fix: str) -> bytes:
    """The bytes of `path`; a missing/unreadable file is a PkiError saying `what` it is and `fix`."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist: {fix}") from None
    except IsADirectoryError:
        raise PkiError(f"{what} {path} is a directory, not a file: {fix}") from None
    except PermissionError:
        raise PkiError(
            f"cannot read {what} {path} (permission denied): run fednode as the user that owns it"
        ) from None
    except OSError as e:
        raise PkiError(f"cannot read {what} {path} ({e.strerror}): {fix}") from None


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600, atomically."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_atomic(Path(path), pem, PRIVATE_KEY_MODE)


def write_public_pem(path: Path, pem: bytes) -> None:
    """Write a certificate or revocation list (PEM), mode 0644, atomically."""
    write_atomic(Path(path), pem, PUBLIC_FILE_MODE)


def warn_if_exposed(path: Path) -> None:
    """Log a warning (with the chmod to run) when key file `path` is readable by group/others."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("key file %s is readable by group/others (mode %03o): run `chmod 600 %s`",
                    path, mode & 0o777, path)
