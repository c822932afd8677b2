"""Moving sealed payloads: push an update to a peer, receive one, serve and fetch state.

Every payload is an end-to-end envelope (fednode.security.envelope) over a stream of chunks;
the receiver decrypts each chunk straight into one preallocated buffer (updates) or into a file
at its offset (state), so memory stays at payload + a few chunks and a broken state transfer
resumes from the next missing chunk, from the same peer or another one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fednode.errors import ProtocolError, Reason
from fednode.learning.compress import decompress
from fednode.node.tensorstream import decode, encode
from fednode.security.envelope import EnvelopeOpener, EnvelopeSealer, PayloadKey
from fednode.security.identity import NodeIdentity
from fednode.security.trust import TrustStore
from fednode.store.atomic import sha256_file
from fednode.transport.base import PeerCallError, Transport
from fednode.v1 import peer_pb2 as pb


@dataclass(frozen=True)
class Recipient:
    node_id: str
    address: str
    payload_public_key: bytes


@dataclass
class ReceivedUpdate:
    sender: str
    epoch: int
    round: int
    weight: float
    tensors: dict[str, torch.Tensor]
    nbytes: int
    level: int = 0
    certificate_der: bytes = b""  # the sender's, as verified on arrival (a later revocation drops it)


async def _sealed_stream(sealer: EnvelopeSealer, pieces, first_chunk: int = 0) -> AsyncIterator[pb.Chunk]:
    yield pb.Chunk(start=sealer.start)
    last = sealer.header.chunk_count - 1
    for i, piece in enumerate(pieces, start=first_chunk):
        yield pb.Chunk(index=i, data=sealer.seal(i, piece), last=i == last)


async def push_update(transport: Transport, identity: NodeIdentity, to: Recipient, tensors: dict[str, torch.Tensor],
                      *, epoch: int, round_: int, weight: float, chunk_size: int, timeout: float,
                      level: int = 0, metadata: dict[str, str] | None = None) -> int:
    """Seal `tensors` for one recipient and stream them; returns payload bytes sent.

    `metadata` travels in the payload header (the codec of `fednode.learning.compress`)."""
    encoded = encode(tensors, {**(metadata or {}), "round": str(round_), "sender": identity.node_id})
    sealer = EnvelopeSealer(sender=identity, recipient_id=to.node_id, recipient_public_key=to.payload_public_key,
                            kind="update", epoch=epoch, round=round_, total_size=encoded.total_size,
                            chunk_size=chunk_size, weight=weight, level=level)
    await transport.push(to.address, _sealed_stream(sealer, encoded.chunks(chunk_size)), timeout)
    return encoded.total_size


def open_envelope(start: pb.EnvelopeStart, *, trust: TrustStore, node_id: str, key: PayloadKey,
                  max_payload: int, kind: str) -> EnvelopeOpener:
    opener = EnvelopeOpener(start, trust=trust, recipient_id=node_id, recipient_key=key, max_total_size=max_payload)
    if opener.header.kind != kind:
        raise ProtocolError(Reason.MALFORMED, f"expected a {kind!r} envelope, got {opener.header.kind!r}")
    return opener


async def receive_update(opener: EnvelopeOpener, chunks: AsyncIterator[pb.Chunk]) -> ReceivedUpdate:
    """Decrypt every chunk into one buffer and map the tensors onto it."""
    header = opener.header
    buffer = bytearray(header.total_size)
    view = memoryview(buffer)
    size = header.chunk_size
    async for chunk in chunks:
        offset = chunk.index * size
        opener.open_into(chunk.index, chunk.data, chunk.last, view[offset:offset + size])
    opener.finish()
    tensors, metadata = decode(buffer)
    tensors = decompress(tensors, metadata)
    return ReceivedUpdate(header.sender_id, header.epoch, header.round, header.weight, tensors, header.total_size,
                          header.level, bytes(opener.certificate_der))


async def serve_state(identity: NodeIdentity, to: Recipient, path: Path, *, sha256: str, round_: int, epoch: int,
                      first_chunk: int, chunk_size: int) -> AsyncIterator[pb.Chunk]:
    """Stream a committed checkpoint file, sealed for the requester, from `first_chunk` on."""
    handle = open(path, "rb")  # an open handle survives a concurrent prune (unlink)
    try:
        total = os.fstat(handle.fileno()).st_size
        chunk_count = max(1, -(-total // chunk_size))
        if first_chunk >= chunk_count:
            raise ProtocolError(Reason.MALFORMED, f"from_chunk {first_chunk} is past the state's {chunk_count} chunks")
        sealer = EnvelopeSealer(sender=identity, recipient_id=to.node_id, recipient_public_key=to.payload_public_key,
                                kind="state", epoch=epoch, round=round_, total_size=total, chunk_size=chunk_size,
                                first_chunk=first_chunk, content_sha256=sha256)
        handle.seek(first_chunk * chunk_size)

        def pieces():
            while True:
                data = handle.read(chunk_size)
                if not data:
                    if total == 0:
                        yield b""
                    return
                yield data

        async for chunk in _sealed_stream(sealer, pieces(), first_chunk):
            yield chunk
    finally:
        handle.close()


@dataclass
class FetchedState:
    path: Path
    sha256: str
    round: int
    epoch: int
    sender: str
    nbytes: int


async def fetch_state(transport: Transport, sources: list[Recipient], *, requester: str, trust: TrustStore,
                      key: PayloadKey, dest_dir: Path, min_round: int, max_payload: int, timeout: float,
                      attempts: int = 6) -> FetchedState:
    """Pull the newest state from `sources`, resuming by chunk after every failure.

    `timeout` bounds the whole fetch (every attempt and the final hash check together), and
    `max_payload` the state's announced size. Raises the last PeerCallError/ProtocolError when no
    source could complete it (ProtocolError(TRUNCATED) when the deadline passed)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sha, next_chunk, total_written = "", 0, 0
    part: Path | None = None
    last_error: Exception | None = None
    for attempt in range(attempts):
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        source = sources[attempt % len(sources)]
        try:
            async with asyncio.timeout(remaining):
                result = await _fetch_once(transport, source, requester=requester, trust=trust, key=key,
                                           dest_dir=dest_dir, min_round=min_round, max_payload=max_payload,
                                           timeout=remaining, resume=(sha, next_chunk, total_written))
        except TimeoutError:
            last_error = ProtocolError(Reason.TRUNCATED, f"state from {source.node_id} did not arrive within "
                                                         f"the fetch deadline ({timeout:g} s)")
            break
        except _Interrupted as stop:
            last_error = stop.error
            sha, next_chunk, total_written = stop.progress
            await asyncio.sleep(min(0.2 * (attempt + 1), 1.0, max(0.0, deadline - loop.time())))
            continue
        if isinstance(result, tuple):  # a different state than the one being resumed: start over
            sha, next_chunk, total_written = result
            continue
        return result
    if sha:
        part = dest_dir / f"state-{sha[:16]}.part"
        part.unlink(missing_ok=True)
    if last_error is None:
        last_error = ProtocolError(Reason.TRUNCATED, f"no state arrived within the fetch deadline ({timeout:g} s)")
    raise last_error


class _Interrupted(Exception):
    """A state transfer that stopped part-way: the peer's error and how far it got
    (sha256, next chunk, bytes written), so the next attempt resumes instead of restarting."""

    def __init__(self, error: PeerCallError | ProtocolError, progress: tuple[str, int, int]):
        super().__init__(str(error))
        self.error, self.progress = error, progress


async def _fetch_once(transport: Transport, source: Recipient, *, requester: str, trust: TrustStore,
                      key: PayloadKey, dest_dir: Path, min_round: int, max_payload: int, timeout: float,
                      resume: tuple[str, int, int]) -> FetchedState | tuple[str, int, int]:
    """One FetchState call. Returns the state, or the (sha, next chunk, bytes) to restart from; a
    failure is raised as `_Interrupted`, with how far it got."""
    sha, next_chunk, total_written = resume
    request = pb.StateRequest(requester_id=requester, min_round=min_round, from_chunk=next_chunk,
                              content_sha256=sha)
    try:
        stream = transport.fetch(source.address, request, timeout)
        first = await anext(stream)
        if not first.HasField("start"):
            raise ProtocolError(Reason.MALFORMED, "state stream did not start with an envelope")
        opener = open_envelope(first.start, trust=trust, node_id=requester, key=key,
                               max_payload=max_payload, kind="state")
        header = opener.header
        if header.content_sha256 != sha or header.first_chunk != next_chunk:
            sha, next_chunk, total_written = header.content_sha256, 0, 0  # a different state: start over
            if header.first_chunk != 0:
                return sha, next_chunk, total_written
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ProtocolError(Reason.MALFORMED, f"state from {source.node_id} announces sha256 {sha[:70]!r}")
        part = dest_dir / f"state-{sha[:16]}.part"
        fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            async for chunk in stream:
                data = opener.open(chunk.index, chunk.data, chunk.last)
                os.pwrite(fd, data, chunk.index * header.chunk_size)
                next_chunk = chunk.index + 1
                total_written += len(data)
            opener.finish()
            os.ftruncate(fd, header.total_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        actual = await asyncio.to_thread(sha256_file, part)
        if actual != sha:
            part.unlink(missing_ok=True)
            sha, next_chunk, total_written = "", 0, 0
            raise ProtocolError(Reason.TAMPERED, f"state from {source.node_id} has sha256 {actual}, "
                                                 f"announced {header.content_sha256}")
        return FetchedState(part, sha, header.round, header.epoch, header.sender_id, total_written)
    except (PeerCallError, ProtocolError) as exc:
        raise _Interrupted(exc, (sha, next_chunk, total_written)) from exc
