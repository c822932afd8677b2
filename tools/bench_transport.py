"""Transport benchmark: a messenger pushed between two daemons over mTLS with envelopes, against
the same bytes over a raw grpc.aio stream (no TLS, no envelopes), in the same run.

The mTLS receiver is a separate process serving the real `PeerService` over a real
`NodeContext` (journal, payload key, membership, inbox, validation); the sender handshakes
with it like a peer would and calls `fednode.node.exchange.push_update`, timed from the start
of the push to the receipt. The raw receiver is another process whose generic stream-unary
handler copies 1 MiB chunks into one preallocated buffer (comparable memory work). Both
receivers measure their RSS just before each transfer and its peak during it (a sampler thread
plus, on Linux, the kernel's exact high-water mark reset through /proc/self/clear_refs).

Throughput is payload bytes / seconds in MB/s with MB = 1e6 bytes; each side's figure is the
median over the repeats, which alternate mTLS and raw so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import datetime as dt
import gc
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import platform
import pstats
import re
import shlex
import shutil
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
MB = 1_000_000
CHUNK_KIB = 1024  # the daemon's default ([limits] chunk_kib)
MAX_CHUNK_KIB = 16 * 1024  # the envelope's limit (fednode.security.envelope.MAX_CHUNK_SIZE)
TENSOR_MIB = 16
RAW_SERVICE = "fednode.bench.Raw"
RAW_METHOD = f"/{RAW_SERVICE}/Push"
TOTAL_BYTES_KEY = "x-bench-total-bytes"
RECEIVER_NAME, SENDER_NAME = "bench-receiver", "bench-sender"
BENCH_TOKENIZER, BENCH_FAMILY = "bench-tokenizer", "bench-family"
ROUND, EPOCH = 1, 0
READY_TIMEOUT_S = 120.0  # a receiver imports torch and grpc, then binds
REPORT_TIMEOUT_S = 60.0
HANDSHAKE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SAMPLE_INTERVAL_S = 0.005


def progress(message: str) -> None:
    print(f"[bench transport] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- memory probes

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil  # not Linux: psutil knows how

        return int(psutil.Process().memory_info().rss)


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            found = re.search(rb"VmHWM:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakRss:
    """RSS just before a window and its peak during it: a sampler thread every few ms, and the
    kernel's exact high-water mark where it can be reset (so short spikes are not missed)."""

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.interval = interval
        self.before = 0
        self._peak = 0
        self._hwm_ok = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.before = rss_bytes()
        self._peak = self.before
        self._hwm_ok = _reset_hwm()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, rss_bytes())

    def stop(self) -> tuple[int, int]:
        """(RSS before, peak RSS during) in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        peak = max(self._peak, rss_bytes())
        if self._hwm_ok:
            peak = max(peak, _hwm_bytes() or 0)
        return self.before, peak


def _cpu_seconds() -> float:
    """CPU time of this whole process (all threads, user + system)."""
    return time.process_time()


def _system_busy_seconds() -> float | None:
    """CPU time all processes of the machine used so far (Linux), to tell how much of a transfer's
    window other work took: the machine's busy time minus the sender's and receiver's own."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != b"cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- payload


def make_payload(size_mib: int, *, tensor_mib: int = TENSOR_MIB, seed: int = 0) -> dict[str, Any]:
    """A messenger-like dict of random float32 tensors totalling `size_mib` MiB."""
    import torch

    if size_mib < 1:
        raise ValueError(f"--size-mib must be at least 1, got {size_mib}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    remaining = size_mib * MIB
    index = 0
    while remaining > 0:
        nbytes = min(tensor_mib * MIB, remaining)
        tensors[f"layers.{index:04d}.weight"] = torch.randn(nbytes // 4, generator=generator, dtype=torch.float32)
        remaining -= nbytes
        index += 1
    return tensors


def validate_finite(tensors: dict[str, Any], *_context: Any) -> None:
    """The plain finiteness check: `torch.isfinite(t).all()` on every floating tensor (what
    fednode.learning.aggregate.validate_update did before it went one-pass)."""
    import torch

    from fednode.errors import ProtocolError, Reason

    if not tensors:
        raise ProtocolError(Reason.MALFORMED, "update holds no tensors")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(Reason.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")


def validate_finite_one_pass(tensors: dict[str, Any], *_context: Any) -> None:
    """The same verdict in one pass without temporaries: a finite L2 norm implies every element is
    finite; only a non-finite norm (NaN/Inf, or a float32 overflow) falls back to the exact check
    (the finiteness part of today's validate_update, without its norm bound)."""
    import math

    import torch

    from fednode.errors import ProtocolError, Reason

    if not tensors:
        raise ProtocolError(Reason.MALFORMED, "update holds no tensors")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or math.isfinite(float(torch.linalg.vector_norm(tensor))):
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(Reason.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")


def validate_like_learner(tensors: dict[str, Any], *_context: Any) -> None:
    """What the daemon's learners run on every update (the default): fednode.learning.aggregate.validate_update,
    which refuses any non-finite tensor and bounds the global L2 norm, against the update's own shapes."""
    from fednode.learning.aggregate import validate_update

    validate_update(tensors, tensors, max_norm=1e6)


# PeerService calls validate(tensors, ...) with whatever else the node passes (e.g. the messenger level)
VALIDATORS: dict[str, Callable[..., None]] = {
    "isfinite": validate_finite, "norm": validate_finite_one_pass, "learner": validate_like_learner}


# --------------------------------------------------------------------------- receivers (child processes)


@dataclass
class ReceiverSpec:
    kind: str  # "mtls" or "raw"
    workdir: str
    ca_path: str = ""
    cert_path: str = ""
    key_path: str = ""
    max_payload_mib: int = 8192
    profile_path: str = ""
    validate: str = "learner"
    chunk_kib: int = CHUNK_KIB


def _server_options() -> list[tuple[str, Any]]:
    from fednode.transport.grpc_transport import MAX_MESSAGE

    return [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0)]


class _Reporter:
    """Sends one record per transfer to the parent, once the received payload is released, so
    the next transfer's 'RSS before' does not count the previous payload."""

    def __init__(self, conn: multiprocessing.connection.Connection):
        self.conn = conn

    def transfer(self, record: dict[str, Any], release: Callable[[], None]) -> None:
        def settle() -> None:
            release()
            gc.collect()
            record["rss_after_release"] = rss_bytes()
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(("transfer", record))

        asyncio.get_running_loop().call_soon(settle)

    def send(self, kind: str, record: dict[str, Any]) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send((kind, record))


class _TimedValidator:
    """Wraps the validate function so the report can split the receiver's time (receive vs validate)."""

    def __init__(self, validate: Callable[..., None]):
        self.validate = validate
        self.seconds = 0.0

    def __call__(self, tensors: dict[str, Any], *context: Any) -> None:
        t0 = time.perf_counter()
        try:
            self.validate(tensors, *context)
        finally:
            self.seconds += time.perf_counter() - t0


class MeasuredPeerHandler:
    """The node's real PeerService, with the receiver's memory and CPU measured around each push."""

    def __init__(self, service: Any, ctx: Any, reporter: _Reporter, timed: _TimedValidator):
        self.service = service
        self.ctx = ctx
        self.reporter = reporter
        self.timed = timed
        self.probe = PeakRss()

    async def handle_handshake(self, hello, caller):
        return await self.service.handle_handshake(hello, caller)

    async def handle_gossip(self, digest, caller):
        return await self.service.handle_gossip(digest, caller)

    def handle_fetch(self, request, caller):
        return self.service.handle_fetch(request, caller)

    async def handle_push(self, start, chunks, caller):
        self.probe.start()
        self.timed.seconds = 0.0
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        try:
            receipt = await self.service.handle_push(start, chunks, caller)
        except BaseException as exc:
            self.probe.stop()
            self.reporter.send("error", {"error": f"{type(exc).__name__}: {exc}"})
            raise
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        before, peak = self.probe.stop()
        record = {"bytes": int(receipt.bytes_received), "seconds": seconds, "validate_s": self.timed.seconds,
                  "cpu_s": cpu, "rss_before": before,
                  "rss_peak": peak, "sender_known": caller.node_id in self.ctx.membership.members,
                  "caller": caller.node_id}
        self.reporter.transfer(record, lambda: self.ctx.inbox.take(ROUND))
        return receipt


async def _serve_mtls(spec: ReceiverSpec, reporter: _Reporter) -> tuple[str, Callable[[], Any]]:
    """Assemble a node context the way fednode.node.daemon does and serve the real PeerService."""
    from fednode import PROTOCOL_VERSION
    from fednode.config import Config, LimitsSection, NodeSection, TlsSection
    from fednode.mesh.membership import Membership
    from fednode.node.context import NodeContext
    from fednode.node.peer_service import PeerService
    from fednode.observability.metrics import NodeMetrics
    from fednode.security.envelope import PayloadKey
    from fednode.security.heartbeat import HeartbeatChain
    from fednode.security.hello import sign_hello
    from fednode.security.pki import TrustStore, load_identity
    from fednode.store.journal import Journal
    from fednode.transport.grpc_transport import GrpcTransport
    from fednode.v1 import peer_pb2 as pb

    data_dir = Path(spec.workdir) / "receiver-data"
    cfg = Config(node=NodeSection(name=RECEIVER_NAME, data_dir=data_dir, listen="127.0.0.1:0"),
                 tls=TlsSection(ca=Path(spec.ca_path), cert=Path(spec.cert_path), key=Path(spec.key_path)),
                 limits=LimitsSection(max_payload_mib=spec.max_payload_mib, chunk_kib=spec.chunk_kib))
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
    trust = TrustStore(identity.ca_pem)
    journal = Journal.open(data_dir / "journal.db")
    payload_key = PayloadKey.load_or_create(data_dir / "payload.key")
    transport = GrpcTransport(identity)
    metrics = NodeMetrics(identity.node_id)
    chain = HeartbeatChain()
    body = pb.HelloBody(node_id=identity.node_id, protocol_version=PROTOCOL_VERSION, tokenizer_hash=BENCH_TOKENIZER,
                        family_hash=BENCH_FAMILY, payload_public_key=payload_key.public_bytes(),
                        address=cfg.advertise, incarnation=journal.next_incarnation(),
                        issued_unix_ms=int(time.time() * 1000), heartbeat_anchor=chain.anchor, heartbeat_base=1)
    membership = Membership(pb.SignedHello(), body, trust, suspect_after=cfg.mesh.suspect_after_s,
                            dead_after=cfg.mesh.dead_after_s, chain=chain)
    ctx = NodeContext(cfg, identity, trust, payload_key, journal, membership, transport, metrics,
                      own_hello=pb.SignedHello(), own_body=body)
    ctx.inbox.open(ROUND)
    timed = _TimedValidator(VALIDATORS[spec.validate])
    service = PeerService(ctx, timed)  # it counts and logs its own refusals
    try:
        bound = await transport.serve(MeasuredPeerHandler(service, ctx, reporter, timed), cfg.node.listen)
    except BaseException:
        journal.close()
        raise
    body.address = bound
    hello = sign_hello(identity, body)
    ctx.own_hello = hello
    membership.self_member.hello = hello
    membership.self_member.body = body
    membership.tick(last_round=0)

    async def close() -> None:
        try:
            await transport.close(grace=0.5)
        finally:
            journal.close()

    return bound, close


async def _serve_raw(spec: ReceiverSpec, reporter: _Reporter) -> tuple[str, Callable[[], Any]]:
    """A plain grpc.aio server: no TLS, no envelopes, no protobuf; chunks are copied into one buffer."""
    import grpc

    probe = PeakRss()

    async def push(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata() or ())
        try:
            total = int(metadata[TOTAL_BYTES_KEY])
        except (KeyError, ValueError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"send the payload size as {TOTAL_BYTES_KEY}")
        if not 0 <= total <= spec.max_payload_mib * MIB:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"payload of {total} bytes is too large")
        probe.start()
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        buffer = bytearray(total)
        view = memoryview(buffer)
        offset = 0
        try:
            async for piece in request_iterator:
                end = offset + len(piece)
                if end > total:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"more than the announced {total} bytes")
                view[offset:end] = piece
                offset = end
            if offset != total:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"got {offset} of {total} bytes")
        except BaseException as exc:
            probe.stop()
            reporter.send("error", {"error": f"{type(exc).__name__}: {exc}"})
            raise
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
        before, peak = probe.stop()
        view.release()
        holder = [buffer]
        del buffer
        reporter.transfer({"bytes": offset, "seconds": seconds, "cpu_s": cpu, "rss_before": before,
                           "rss_peak": peak}, holder.clear)
        return struct.pack("<Q", offset)

    server = grpc.aio.server(options=_server_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        RAW_SERVICE, {"Push": grpc.stream_unary_rpc_method_handler(push)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    if port == 0:
        raise RuntimeError("raw receiver could not bind a loopback port")
    await server.start()

    async def close() -> None:
        await server.stop(0.5)

    return f"127.0.0.1:{port}", close


async def _receiver(spec: ReceiverSpec, control: multiprocessing.connection.Connection,
                    reports: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def watch_parent() -> None:
        with contextlib.suppress(EOFError, OSError):
            control.recv()  # "stop", or EOF when the parent is gone: either way, stop
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
    reporter = _Reporter(reports)
    serve = _serve_mtls if spec.kind == "mtls" else _serve_raw
    address, close = await serve(spec, reporter)
    reporter.send("ready", {"address": address, "pid": os.getpid(), "rss": rss_bytes()})
    try:
        await stop.wait()
    finally:
        await asyncio.wait_for(close(), STOP_TIMEOUT_S)


def receiver_main(spec: ReceiverSpec, control: multiprocessing.connection.Connection,
                  reports: multiprocessing.connection.Connection) -> None:
    """Entry point of a receiver process (multiprocessing, spawn)."""
    # Ctrl-C reaches the whole process group: the parent decides when receivers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout = sys.stderr  # the parent's last stdout line is the JSON result: keep stdout clean
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"[receiver {spec.kind}] %(levelname)s %(name)s: %(message)s")
    profiler = cProfile.Profile() if spec.profile_path else None
    try:
        if profiler is not None:
            profiler.enable()
        asyncio.run(_receiver(spec, control, reports))
    except BaseException as exc:
        with contextlib.suppress(OSError, ValueError):
            reports.send(("error", {"error": f"receiver {spec.kind} failed: {type(exc).__name__}: {exc}"}))
        raise
    finally:
        if profiler is not None:
            profiler.disable()
            _write_profile(profiler, Path(spec.profile_path))


def _write_profile(profiler: cProfile.Profile, path: Path) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats(40)
    path.write_text(out.getvalue())


class ReceiverProcess:
    """A receiver child process and its pipes; `stop` always ends it (stop, terminate, kill)."""

    def __init__(self, spec: ReceiverSpec):
        ctx = multiprocessing.get_context("spawn")
        self.spec = spec
        control_r, self._control = ctx.Pipe(duplex=False)
        self._reports, reports_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=receiver_main, args=(spec, control_r, reports_w),
                                   name=f"bench-receiver-{spec.kind}", daemon=True)
        self.address = ""
        self.pid = 0
        try:
            self.process.start()
        finally:  # only the child keeps its ends: our copies would hide its exit / our exit from it
            control_r.close()
            reports_w.close()

    def next_report(self, timeout: float, want: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"receiver {self.spec.kind} sent no {want!r} report within {timeout:.0f} s")
            try:
                ready = self._reports.poll(min(left, 0.5))
            except (EOFError, OSError):
                ready = True
            if ready:
                try:
                    kind, record = self._reports.recv()
                except (EOFError, OSError):
                    self.process.join(2)
                    raise RuntimeError(f"receiver {self.spec.kind} exited (code {self.process.exitcode})") from None
                if kind == "error":
                    raise RuntimeError(f"receiver {self.spec.kind}: {record['error']}")
                if kind == want:
                    return record
            elif not self.process.is_alive():
                raise RuntimeError(f"receiver {self.spec.kind} exited (code {self.process.exitcode})")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> str:
        record = self.next_report(timeout, "ready")
        self.address, self.pid = record["address"], record["pid"]
        return self.address

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._control.send("stop")
        self.process.join(STOP_TIMEOUT_S)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        for conn in (self._control, self._reports):
            with contextlib.suppress(OSError):
                conn.close()


# --------------------------------------------------------------------------- sender


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
class Options:
    size_mib: int = 256
    repeats: int = 3
    skip_raw: bool = False
    timeout_s: float | None = None
    profile_dir: Path | None = None
    validate: str = "learner"
    chunk_kib: int = CHUNK_KIB
    command: str = ""

    @property
    def chunk_size(self) -> int:
        return self.chunk_kib * 1024

    @property
    def push_timeout(self) -> float:
        # generous: assumes at least 2 MiB/s, so only a hung transfer ever hits it
        return self.timeout_s if self.timeout_s is not None else 60.0 + 0.5 * self.size_mib


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
    now = _system_busy_seconds()
    return None if start is None or now is None else now - start


async def _sender(opts: Options, identity: Any, tensors: dict[str, Any], mtls_rx: ReceiverProcess,
                  raw_rx: ReceiverProcess | None, results: Results) -> None:
    import grpc

    from fednode import PROTOCOL_VERSION
    from fednode.node.exchange import Recipient, push_update
    from fednode.security.envelope import PayloadKey
    from fednode.security.heartbeat import HeartbeatChain
    from fednode.security.hello import check_compatible, sign_hello, verify_hello
    from fednode.security.pki import TrustStore
    from fednode.transport.grpc_transport import MAX_MESSAGE, GrpcTransport
    from fednode.transport.tensorstream import encode
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
            busy0, cpu0, t0 = _system_busy_seconds(), _cpu_seconds(), time.perf_counter()
            sent = await push_update(transport, identity, recipient, tensors, epoch=EPOCH, round_=ROUND,
                                     weight=1.0, chunk_size=opts.chunk_size, timeout=opts.push_timeout)
            seconds, cpu, busy = time.perf_counter() - t0, _cpu_seconds() - cpu0, _busy_since(busy0)
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
                busy0, cpu0, t0 = _system_busy_seconds(), _cpu_seconds(), time.perf_counter()
                sent = await _push_raw(raw_channel, encoded, opts.chunk_size, opts.push_timeout)
                seconds, cpu, busy = time.perf_counter() - t0, _cpu_seconds() - cpu0, _busy_since(busy0)
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


# --------------------------------------------------------------------------- orchestration


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import cryptography
    import grpc
    import torch
    from google.protobuf import __version__ as protobuf_version
    from google.protobuf.internal import api_implementation

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    openssl = ""
    with contextlib.suppress(Exception):
        from cryptography.hazmat.backends.openssl.backend import backend

        openssl = backend.openssl_version_text()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "python": platform.python_version(), "grpcio": grpc.__version__, "cryptography": cryptography.__version__,
            "openssl": openssl, "protobuf": f"{protobuf_version} ({api_implementation.Type()})",
            "torch": torch.__version__}


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _other_share(results: Results) -> float | None:
    """CPU seconds other processes took during the timed transfers, per second of transfer: ~0 on a
    quiet machine; above ~0.1 the figures are contended (the machine has few cores)."""
    runs = results.mtls + results.raw
    if not runs or any(t.other_cpu_s is None for t in runs):
        return None
    return round(sum(t.other_cpu_s or 0.0 for t in runs) / sum(t.seconds for t in runs), 3)


def build_result(opts: Options, results: Results, machine: dict[str, Any]) -> dict[str, Any]:
    mtls = _median([t.mbps for t in results.mtls])
    raw = _median([t.mbps for t in results.raw])
    over = max((t.receiver["rss_peak"] - t.receiver["rss_before"]) / t.bytes for t in results.mtls)
    peak = max(t.receiver["rss_peak"] for t in results.mtls)
    raw_over = max(((t.receiver["rss_peak"] - t.receiver["rss_before"]) / t.bytes for t in results.raw),
                   default=None)
    return {
        "bench": "transport",
        "size_mib": opts.size_mib,
        "payload_bytes": results.payload_bytes,
        "repeats": opts.repeats,
        "mtls_e2e_MBps": mtls,
        "raw_MBps": raw,
        "ratio": round(mtls / raw, 4) if mtls and raw else None,
        "peak_rss_over_payload": round(over, 4),
        "receiver_peak_rss_mib": round(peak / MIB, 1),
        "raw_receiver_peak_rss_over_payload": round(raw_over, 4) if raw_over is not None else None,
        "chunk_kib": opts.chunk_kib,
        "validate": opts.validate,
        "units": "MB/s with MB = 1e6 bytes of payload; median over repeats; peak_rss_over_payload = max over "
                 "mTLS repeats of (receiver peak RSS during the transfer - RSS just before) / payload bytes",
        "targets": {"ratio_min": 0.5, "peak_rss_over_payload_max": 1.5},
        "runs": [t.summary() for pair in zip(results.mtls, results.raw or [None] * len(results.mtls), strict=True)
                 for t in pair if t is not None],
        "machine": machine,
        "other_cpu_share": _other_share(results),
        "loadavg_before": results.loadavg_before,
        "loadavg_after": load_average(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": opts.command,
    }


def targets_met(result: dict[str, Any]) -> bool:
    ratio_ok = result["ratio"] is None or result["ratio"] >= result["targets"]["ratio_min"]
    return ratio_ok and result["peak_rss_over_payload"] < result["targets"]["peak_rss_over_payload_max"]


def run(opts: Options) -> dict[str, Any]:
    """Run the whole benchmark; every process and directory it makes is gone when it returns or raises."""
    from fednode.security import pki

    if opts.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {opts.repeats}")
    if not 1 <= opts.chunk_kib <= MAX_CHUNK_KIB:
        raise ValueError(f"--chunk-kib must be in [1, {MAX_CHUNK_KIB}], got {opts.chunk_kib}")
    if opts.validate not in VALIDATORS:
        raise ValueError(f"--validate must be one of {sorted(VALIDATORS)}, got {opts.validate!r}")
    workdir = Path(tempfile.mkdtemp(prefix="fednode-bench-transport-"))
    receivers: list[ReceiverProcess] = []
    try:
        progress(f"mesh CA and node certificates in {workdir}")
        pki.init_ca(workdir / "ca", name="fednode bench CA")
        loopback = ["127.0.0.1", "localhost"]
        rx_files = pki.issue_node(workdir / "ca", RECEIVER_NAME, loopback)
        tx_files = pki.issue_node(workdir / "ca", SENDER_NAME, loopback)
        identity = pki.load_identity(tx_files.cert_path, tx_files.key_path, tx_files.ca_path)
        if opts.profile_dir is not None:
            opts.profile_dir.mkdir(parents=True, exist_ok=True)

        def profile_path(name: str) -> str:
            return str(opts.profile_dir / f"{name}.txt") if opts.profile_dir is not None else ""

        max_payload_mib = max(8192, opts.size_mib + 64)
        mtls_rx = ReceiverProcess(ReceiverSpec("mtls", str(workdir), str(rx_files.ca_path), str(rx_files.cert_path),
                                               str(rx_files.key_path), max_payload_mib, profile_path("receiver-mtls"),
                                               opts.validate, opts.chunk_kib))
        receivers.append(mtls_rx)
        raw_rx = None
        if not opts.skip_raw:
            raw_rx = ReceiverProcess(ReceiverSpec("raw", str(workdir), max_payload_mib=max_payload_mib,
                                                  profile_path=profile_path("receiver-raw")))
            receivers.append(raw_rx)
        progress(f"building a {opts.size_mib} MiB payload of float32 tensors ({TENSOR_MIB} MiB each)")
        tensors = make_payload(opts.size_mib)
        for rx in receivers:
            rx.wait_ready()
            progress(f"receiver {rx.spec.kind} (pid {rx.pid}) serving at {rx.address}")
        results = Results(loadavg_before=load_average())
        profiler = cProfile.Profile() if opts.profile_dir is not None else None
        if profiler is not None:
            profiler.enable()
        try:
            asyncio.run(_sender(opts, identity, tensors, mtls_rx, raw_rx, results))
        finally:
            if profiler is not None:
                profiler.disable()
                _write_profile(profiler, opts.profile_dir / "sender.txt")  # type: ignore[operator]
        del tensors
        return build_result(opts, results, machine_info())
    finally:
        for rx in receivers:
            rx.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def human_summary(result: dict[str, Any]) -> str:
    size = result["payload_bytes"] / MIB
    lines = [f"transport benchmark: {size:.0f} MiB payload, {result['repeats']} repeat(s), "
             f"{result['chunk_kib']} KiB chunks (MB = 1e6 bytes, medians)",
             f"  mTLS + envelopes, end to end : {result['mtls_e2e_MBps']} MB/s"]
    if result["raw_MBps"] is not None:
        lines.append(f"  raw grpc.aio, no TLS         : {result['raw_MBps']} MB/s")
        lines.append(f"  ratio                        : {result['ratio']} (target >= 0.5)")
    lines.append(f"  receiver peak RSS / payload  : {result['peak_rss_over_payload']} (target < 1.5); "
                 f"absolute peak {result['receiver_peak_rss_mib']} MiB")
    lines.append(f"  receiver validation          : {result['validate']}; other processes' CPU during transfers: "
                 f"{result['other_cpu_share']} cores; load average before/after: {result['loadavg_before']} / "
                 f"{result['loadavg_after']} on {result['machine']['cores']} cores")
    return "\n".join(lines)


def main(opts: Options, *, check: bool = False) -> int:
    """CLI body: progress on stderr, a human summary, then one JSON object as the last stdout line."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)  # run the finally blocks: receivers stopped, temp dir removed

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(opts)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(human_summary(result), flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    if check and not targets_met(result):
        progress("targets missed (ratio >= 0.5 and peak RSS / payload < 1.5)")
        return 1
    return 0


def command_line() -> str:
    argv0 = sys.argv[0] if sys.argv else "fednode-bench"
    if argv0.endswith(".py"):
        with contextlib.suppress(ValueError):
            argv0 = os.path.relpath(argv0)
        return shlex.join(["python", argv0, *sys.argv[1:]])
    return shlex.join([os.path.basename(argv0), *sys.argv[1:]])
