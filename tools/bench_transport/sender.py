"""The sender: handshakes with the mTLS receiver like a peer, then times each repeat's push over mTLS with
envelopes (`fednode.node.exchange.push_update`) and over the raw stream; `Transfer` is one timed push."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from tools.bench_transport.common import (
    BENCH_FAMILY,
    BENCH_TOKENIZER,
    EPOCH,
    HANDSHAKE_TIMEOUT_S,
    MB,
    MIB,
    RAW_METHOD,
    REPORT_TIMEOUT_S,
    ROUND,
    STOP_TIMEOUT_S,
    TOTAL_BYTES_KEY,
    Options,
    progress,
)
from tools.bench_transport.receiver import ReceiverProcess
from tools.bench_transport.resources import cpu_seconds, system_busy_seconds


@dataclass
class Transfer:
    path: str
    bytes: int
    seconds: float
    sender_cpu_s: float
    receiver: dict[str, Any]
    machine_busy_s: float | None = None

    @property
    def other_cpu_s(self) -> float | None:
        """CPU seconds other processes took during the transfer (noise: compare runs where it is ~0)."""
        if self.machine_busy_s is None:
            return None
        return max(0.0, self.machine_busy_s - self.sender_cpu_s - self.receiver["cpu_s"])

    @property
    def mbps(self) -> float:
        return self.bytes / MB / self.seconds

    def summary(self) -> dict[str, Any]:
        r = self.receiver
        return {"path": self.path, "bytes": self.bytes, "seconds": round(self.seconds, 4),
                "MBps": round(self.mbps, 2), "sender_cpu_s": round(self.sender_cpu_s, 3),
                "receiver_cpu_s": round(r["cpu_s"], 3), "receiver_seconds": round(r["seconds"], 4),
                **({"receiver_validate_s": round(r["validate_s"], 4)} if "validate_s" in r else {}),
                "receiver_rss_before_mib": round(r["rss_before"] / MIB, 1),
                "receiver_peak_rss_mib": round(r["rss_peak"] / MIB, 1),
                "peak_rss_over_payload": round((r["rss_peak"] - r["rss_before"]) / self.bytes, 4),
                "other_cpu_s": None if self.other_cpu_s is None else round(self.other_cpu_s, 2)}


@dataclass
class Results:
    payload_bytes: int = 0
    loadavg_before: list[float] | None = None
    mtls: list[Transfer] = field(default_factory=list)
    raw: list[Transfer] = field(default_factory=list)


def _raw_pieces(encoded: Any, chunk_size: int) -> Iterator[bytes]:
    for piece in encoded.chunks(chunk_size):
        yield bytes(piece)  # grpc without serializers sends bytes: one copy, like a real raw sender


async def _push_raw(channel: Any, encoded: Any, chunk_size: int, timeout: float) -> int:
    call = channel.stream_unary(RAW_METHOD)

    async def pieces() -> AsyncIterator[bytes]:
        for piece in _raw_pieces(encoded, chunk_size):
            yield piece

    answer = await call(pieces(), metadata=((TOTAL_BYTES_KEY, str(encoded.total_size)),), timeout=timeout)
    (received,) = struct.unpack("<Q", answer)
    if received != encoded.total_size:
        raise RuntimeError(f"raw receiver got {received} of {encoded.total_size} bytes")
    return received


def _noise(transfer: Transfer) -> str:
    other = transfer.other_cpu_s
    return "" if other is None else f"; other processes used {other:.2f} CPU-s meanwhile"


def _busy_since(start: float | None) -> float | None:
    now = system_busy_seconds()
    return None if start is None or now is None else now - start


async def run_sender(opts: Options, identity: Any, tensors: dict[str, Any], mtls_rx: ReceiverProcess,
                  raw_rx: ReceiverProcess | None, results: Results) -> None:
    import grpc

    from fednode import PROTOCOL_VERSION
    from fednode.node.exchange import Recipient, push_update
    from fednode.node.tensorstream import encode
    from fednode.security.envelope import PayloadKey
    from fednode.security.heartbeat import HeartbeatChain
    from fednode.security.hello import check_compatible, sign_hello, verify_hello
    from fednode.security.trust import TrustStore
    from fednode.transport.grpc_transport import MAX_MESSAGE, GrpcTransport
    from fednode.v1 import peer_pb2 as pb

    transport = GrpcTransport(identity)
    raw_channel = None
    try:
        # Handshake first, like a peer: the receiver's membership learns us from our signed Hello
        # and we learn its payload key from its signed answer.
        body = pb.HelloBody(node_id=identity.node_id, protocol_version=PROTOCOL_VERSION,
                            tokenizer_hash=BENCH_TOKENIZER, family_hash=BENCH_FAMILY,
                            payload_public_key=PayloadKey.generate().public_bytes(), address="127.0.0.1:1",
                            incarnation=1, issued_unix_ms=int(time.time() * 1000),
                            heartbeat_anchor=HeartbeatChain(length=1).anchor, heartbeat_base=1)
        answer = await transport.handshake(mtls_rx.address, sign_hello(identity, body), HANDSHAKE_TIMEOUT_S)
        peer = verify_hello(TrustStore(identity.ca_pem), answer)
        check_compatible(body, peer)
        recipient = Recipient(peer.node_id, mtls_rx.address, bytes(peer.payload_public_key))
        if raw_rx is not None:
            raw_channel = grpc.aio.insecure_channel(raw_rx.address, options=[
                ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)])
            await asyncio.wait_for(raw_channel.channel_ready(), HANDSHAKE_TIMEOUT_S)
        encoded = encode(tensors)
        results.payload_bytes = encoded.total_size

        for i in range(opts.repeats):
            busy0, cpu0, t0 = system_busy_seconds(), cpu_seconds(), time.perf_counter()
            sent = await push_update(transport, identity, recipient, tensors, epoch=EPOCH, round_=ROUND,
                                     weight=1.0, chunk_size=opts.chunk_size, timeout=opts.push_timeout)
            seconds, cpu, busy = time.perf_counter() - t0, cpu_seconds() - cpu0, _busy_since(busy0)
            report = await asyncio.to_thread(mtls_rx.next_report, REPORT_TIMEOUT_S, "transfer")
            if report["bytes"] != sent:
                raise RuntimeError(f"receiver accepted {report['bytes']} bytes, {sent} were sent")
            if not report["sender_known"]:
                raise RuntimeError("the receiver's membership does not know the sender after its Handshake")
            results.payload_bytes = sent
            transfer = Transfer("mtls", sent, seconds, cpu, report, busy)
            results.mtls.append(transfer)
            progress(f"repeat {i + 1}/{opts.repeats} mTLS+envelope: {transfer.mbps:8.1f} MB/s "
                     f"({seconds:.2f} s; receiver peak RSS +{(report['rss_peak'] - report['rss_before']) / MIB:.0f}"
                     f" MiB over {sent / MIB:.0f} MiB payload{_noise(transfer)})")
            if raw_channel is not None:
                busy0, cpu0, t0 = system_busy_seconds(), cpu_seconds(), time.perf_counter()
                sent = await _push_raw(raw_channel, encoded, opts.chunk_size, opts.push_timeout)
                seconds, cpu, busy = time.perf_counter() - t0, cpu_seconds() - cpu0, _busy_since(busy0)
                report = await asyncio.to_thread(raw_rx.next_report, REPORT_TIMEOUT_S, "transfer")  # type: ignore[union-attr]
                transfer = Transfer("raw", sent, seconds, cpu, report, busy)
                results.raw.append(transfer)
                progress(f"repeat {i + 1}/{opts.repeats} raw grpc.aio:      {transfer.mbps:8.1f} MB/s "
                         f"({seconds:.2f} s{_noise(transfer)})")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(transport.close(grace=0.5), STOP_TIMEOUT_S)
        if raw_channel is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(raw_channel.close(), STOP_TIMEOUT_S)
