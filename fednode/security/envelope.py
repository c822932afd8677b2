"""End-to-end payload envelopes: only the recipient can read a messenger, whoever relays it.

Per envelope the sender makes an ephemeral X25519 key; ECDH with the recipient's static payload
key -> HKDF-SHA256 -> one AES-256-GCM key. Chunk i is sealed with nonce = last-flag || 0^3 ||
i (big-endian u64) and AAD = SHA-256(exact signed header bytes), so any altered, reordered,
dropped-last or truncated chunk fails to open. The header is signed by the sender's certificate
key. Replay protection lives in the journal, keyed by header.message_id.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from google.protobuf.message import DecodeError

from fednode.errors import PkiError, ProtocolError, Reason, StoreError
from fednode.security import bounds
from fednode.security.identity import NodeIdentity
from fednode.security.trust import TrustStore
from fednode.store.atomic import create_atomic
from fednode.v1 import peer_pb2

log = logging.getLogger(__name__)

HKDF_INFO = b"fednode/v1 envelope"
KEY_BYTES = 32
TAG_BYTES = 16
MESSAGE_ID_BYTES = 16
DEFAULT_CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
_NONCE = struct.Struct(">B3xQ")  # last flag, 3 zero bytes, chunk index


class PayloadKey:
    """A node's static X25519 key; its public half travels in the signed Hello."""

    def __init__(self, private: X25519PrivateKey):
        self.private = private
        self._public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls) -> PayloadKey:
        return cls(X25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: Path) -> PayloadKey:
        """Load the raw 32-byte key at `path`, or create it (0600, atomically: two starting
        processes end up with the same key, never half a file)."""
        path = Path(path)
        try:
            return cls._load(path)
        except FileNotFoundError:
            pass
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        try:
            created = create_atomic(path, raw, 0o600)
        except StoreError as e:
            cause = e.__cause__
            reason = cause.strerror if isinstance(cause, OSError) else str(e)
            raise PkiError(f"cannot create payload key {path} ({reason}): make its directory exist "
                           "and be writable by the fednode user") from None
        if not created:  # someone else created it meanwhile: use theirs
            return cls._load(path)
        return cls(key)

    @classmethod
    def _load(cls, path: Path) -> PayloadKey:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise PkiError(f"cannot read payload key {path} ({e.strerror}): run fednode as the user "
                           "that owns it") from None
        if len(raw) != KEY_BYTES:
            raise PkiError(f"payload key {path} is corrupt ({len(raw)} bytes, expected {KEY_BYTES}): "
                           "delete it to make a new one (peers learn the new key from the next Hello)")
        if os.stat(path).st_mode & 0o077:
            log.warning("payload key %s is readable by group/others: run `chmod 600 %s`", path, path)
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def public_bytes(self) -> bytes:
        return self._public


def _derive(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral_public + recipient_public,
               info=HKDF_INFO).derive(shared)
    return AESGCM(key)


def expected_chunk_count(total_size: int, chunk_size: int) -> int:
    """ceil(total/chunk), but at least 1: an empty payload is one empty (authenticated) chunk."""
    return max(1, -(-total_size // chunk_size))


def _chunk_length(header: peer_pb2.EnvelopeHeader, index: int) -> int:
    if index < header.chunk_count - 1:
        return header.chunk_size
    return header.total_size - (header.chunk_count - 1) * header.chunk_size


class EnvelopeSealer:
    """Sender side: builds and signs the header, then seals chunks in order (strict order also
    guarantees a (key, nonce) pair is never used for two different plaintexts)."""

    def __init__(self, *, sender: NodeIdentity, recipient_id: str, recipient_public_key: bytes,
                 kind: str, epoch: int, round: int, total_size: int,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, first_chunk: int = 0, weight: float = 0.0,
                 content_sha256: str = "", message_id: bytes | None = None, level: int = 0):
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size {chunk_size} is outside [1, {MAX_CHUNK_SIZE}]: pick e.g. 1 MiB")
        if total_size < 0:
            raise ValueError(f"total_size {total_size} is negative: pass the plaintext length")
        chunk_count = expected_chunk_count(total_size, chunk_size)
        if not 0 <= first_chunk < chunk_count:
            raise ValueError(f"first_chunk {first_chunk} is outside [0, {chunk_count}): resume from a "
                             "chunk the payload has")
        message_id = os.urandom(MESSAGE_ID_BYTES) if message_id is None else bytes(message_id)
        if len(message_id) != MESSAGE_ID_BYTES:
            raise ValueError(f"message_id must be {MESSAGE_ID_BYTES} bytes, got {len(message_id)}")
        recipient_public_key = bytes(recipient_public_key)
        if len(recipient_public_key) != KEY_BYTES:
            raise ValueError(f"recipient public key must be {KEY_BYTES} raw bytes, got "
                             f"{len(recipient_public_key)}: take it from the peer's verified Hello")
        ephemeral = X25519PrivateKey.generate()
        ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw,
                                                               serialization.PublicFormat.Raw)
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_public_key))
        except ValueError:
            raise ProtocolError(Reason.MALFORMED, f"payload key announced by {recipient_id} is a "
                                                  "low-order X25519 point: that node must regenerate it") \
                from None
        self._aead = _derive(shared, ephemeral_public, recipient_public_key)
        self._header = peer_pb2.EnvelopeHeader(
            sender_id=sender.node_id, recipient_id=recipient_id, epoch=epoch, round=round,
            message_id=message_id, kind=kind, ephemeral_public_key=ephemeral_public,
            total_size=total_size, chunk_size=chunk_size, chunk_count=chunk_count,
            first_chunk=first_chunk, weight=weight, content_sha256=content_sha256,
            created_unix_ms=time.time_ns() // 1_000_000, level=level,
        )
        header_bytes = self._header.SerializeToString(deterministic=True)
        self._aad = hashlib.sha256(header_bytes).digest()
        self._start = peer_pb2.EnvelopeStart(header=header_bytes, signature=sender.sign(header_bytes),
                                             sender_certificate_der=sender.cert_der)
        self._next = first_chunk

    @property
    def start(self) -> peer_pb2.EnvelopeStart:
        return self._start

    @property
    def header(self) -> peer_pb2.EnvelopeHeader:
        return self._header

    @property
    def chunk_count(self) -> int:
        return self._header.chunk_count

    def seal(self, index: int, plaintext: bytes | memoryview) -> bytes:
        """Ciphertext + tag of chunk `index` (must be the next one; `last` follows from the index)."""
        header = self._header
        if index != self._next:
            raise ValueError(f"chunk {index} sealed out of order (next is {self._next}): seal chunks "
                             "in order, once each; make a new sealer to resend")
        if len(plaintext) != _chunk_length(header, index):
            raise ValueError(f"chunk {index} has {len(plaintext)} bytes, expected "
                             f"{_chunk_length(header, index)}: split the payload by chunk_size")
        last = index == header.chunk_count - 1
        self._next = index + 1
        return self._aead.encrypt(_NONCE.pack(last, index), plaintext, self._aad)


class EnvelopeOpener:
    """Recipient side: checks the signed header once, then opens chunks strictly in order.
    After any ProtocolError the envelope is refused: discard the opener."""

    def __init__(self, start: peer_pb2.EnvelopeStart, *, trust: TrustStore, recipient_id: str,
                 recipient_key: PayloadKey, max_total_size: int | None = None):
        signer = trust.verify_signature(start.sender_certificate_der, start.header, start.signature)
        header = peer_pb2.EnvelopeHeader()
        try:
            header.ParseFromString(start.header)
        except DecodeError:
            raise ProtocolError(Reason.MALFORMED, f"envelope header from {signer} does not parse: send a "
                                                  "serialized fednode.v1.EnvelopeHeader") from None
        if header.sender_id != signer:
            raise ProtocolError(Reason.BAD_CERTIFICATE,
                                f"envelope header names sender {header.sender_id!r} but is signed by "
                                f"{signer!r}: a node may only send under its own certificate")
        if header.recipient_id != recipient_id:
            raise ProtocolError(Reason.WRONG_RECIPIENT,
                                f"envelope from {signer} is for {header.recipient_id!r}, not "
                                f"{recipient_id!r}: the sender must seal it for this node's id and key")
        self._check_shape(header, signer)
        if max_total_size is not None and header.total_size > max_total_size:
            raise ProtocolError(Reason.OVERSIZE,
                                f"envelope from {signer} holds {header.total_size} bytes, more than the "
                                f"{max_total_size} accepted here: send a smaller payload or raise the limit")
        try:
            shared = recipient_key.private.exchange(
                X25519PublicKey.from_public_bytes(header.ephemeral_public_key))
        except ValueError:
            raise ProtocolError(Reason.MALFORMED, f"envelope from {signer} has a low-order ephemeral "
                                                  "key: the sender must use a fresh X25519 key") from None
        self._aead = _derive(shared, header.ephemeral_public_key, recipient_key.public_bytes())
        self._aad = hashlib.sha256(start.header).digest()
        self._header = header
        self._sender_id = signer
        self._certificate_der = bytes(start.sender_certificate_der)
        self._next = header.first_chunk
        self._last_index = header.chunk_count - 1
        self._done = False

    @staticmethod
    def _check_shape(header: peer_pb2.EnvelopeHeader, signer: str) -> None:
        def malformed(detail: str) -> ProtocolError:
            return ProtocolError(Reason.MALFORMED, f"envelope from {signer}: {detail}")

        who = signer or "?"
        bounds.check_int("envelope epoch", header.epoch, bounds.MAX_EPOCH, who=who)
        bounds.check_int("envelope round", header.round, bounds.MAX_ROUND, who=who)
        bounds.check_int("envelope level", header.level, bounds.MAX_LEVEL, who=who)
        bounds.check_int("envelope first_chunk", header.first_chunk, bounds.MAX_CHUNKS, who=who)
        if len(header.ephemeral_public_key) != KEY_BYTES:
            raise malformed(f"ephemeral key has {len(header.ephemeral_public_key)} bytes, expected "
                            f"{KEY_BYTES}: send a raw X25519 public key")
        if len(header.message_id) != MESSAGE_ID_BYTES:
            raise malformed(f"message_id has {len(header.message_id)} bytes, expected {MESSAGE_ID_BYTES}:"
                            " send 16 random bytes")
        if not 1 <= header.chunk_size <= MAX_CHUNK_SIZE:
            raise malformed(f"chunk_size {header.chunk_size} is outside [1, {MAX_CHUNK_SIZE}]: use "
                            "chunks of at most 16 MiB")
        expected = expected_chunk_count(header.total_size, header.chunk_size)
        if header.chunk_count != expected:
            raise malformed(f"chunk_count {header.chunk_count} does not fit total_size "
                            f"{header.total_size} / chunk_size {header.chunk_size} (expected {expected})")
        if header.first_chunk >= header.chunk_count:
            raise malformed(f"first_chunk {header.first_chunk} is past the last chunk "
                            f"{header.chunk_count - 1}: resume from an existing chunk")

    @property
    def header(self) -> peer_pb2.EnvelopeHeader:
        return self._header

    @property
    def sender_id(self) -> str:
        return self._sender_id

    @property
    def certificate_der(self) -> bytes:
        """The sender's certificate the header was verified with."""
        return self._certificate_der

    @property
    def next_index(self) -> int:
        return self._next

    @property
    def done(self) -> bool:
        return self._done

    def _check(self, index: int, ciphertext_len: int, last: bool) -> tuple[bytes, int]:
        """Order/last-flag/length checks before decrypting; returns (nonce, plaintext length)."""
        who = self._sender_id
        if self._done:
            raise ProtocolError(Reason.OUT_OF_ORDER, f"chunk {index} from {who} after the last chunk: "
                                                     "the sender must stop after the chunk flagged last")
        if index != self._next:
            raise ProtocolError(Reason.OUT_OF_ORDER, f"chunk {index} from {who} arrived, expected "
                                                     f"{self._next}: the sender must send chunks in order")
        is_last = index == self._last_index
        if last and not is_last:
            raise ProtocolError(Reason.TRUNCATED, f"chunk {index} from {who} is flagged last but the "
                                                  f"envelope has {self._header.chunk_count} chunks")
        if is_last and not last:
            raise ProtocolError(Reason.OUT_OF_ORDER, f"chunk {index} from {who} is the final chunk but is "
                                                     "not flagged last: the sender must flag it")
        length = _chunk_length(self._header, index)
        if ciphertext_len != length + TAG_BYTES:
            raise ProtocolError(Reason.MALFORMED, f"chunk {index} from {who} has {ciphertext_len} bytes, "
                                                  f"expected {length + TAG_BYTES} (plaintext {length} + tag)")
        return _NONCE.pack(is_last, index), length

    def _advance(self, index: int) -> None:
        self._next = index + 1
        self._done = index == self._last_index

    def _tampered(self, index: int) -> ProtocolError:
        return ProtocolError(Reason.TAMPERED, f"chunk {index} from {self._sender_id} fails authentication: "
                                              "it was altered in transit or not sealed for this node's key")

    def open(self, index: int, ciphertext: bytes, last: bool) -> bytes:
        """Plaintext of chunk `index` (which must be the next expected one)."""
        nonce, _ = self._check(index, len(ciphertext), last)
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, self._aad)
        except InvalidTag:
            raise self._tampered(index) from None
        self._advance(index)
        return plaintext

    def open_into(self, index: int, ciphertext: bytes, last: bool, out: memoryview) -> int:
        """Like open, but decrypts straight into `out` (no copy); returns the bytes written.
        On TAMPERED the written region is zeroed (never leave unauthenticated plaintext)."""
        nonce, length = self._check(index, len(ciphertext), last)
        view = memoryview(out).cast("B")
        if len(view) < length:
            raise ValueError(f"buffer of {len(view)} bytes is too small for chunk {index} ({length} bytes)")
        target = view[:length]
        try:
            self._aead.decrypt_into(nonce, ciphertext, self._aad, target)
        except InvalidTag:
            target[:] = bytes(length)
            raise self._tampered(index) from None
        self._advance(index)
        return length

    def finish(self) -> None:
        """Call when the stream ends: refuses an envelope whose last chunk never came."""
        if not self._done:
            raise ProtocolError(Reason.TRUNCATED,
                                f"envelope from {self._sender_id} ended after chunk {self._next - 1} of "
                                f"{self._header.chunk_count}: the sender must resend (or resume from "
                                f"chunk {self._next})")
