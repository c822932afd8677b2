"""The receivers, each a child process (multiprocessing, spawn): the real `PeerService` over mTLS with
envelopes, or a raw grpc.aio stream copied into one buffer; both report each transfer's time, CPU and RSS
to the parent through a pipe."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import io
import logging
import multiprocessing
import multiprocessing.connection
import os
import pstats
import signal
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.bench_transport.common import (
    BENCH_FAMILY,
    BENCH_TOKENIZER,
    CHUNK_KIB,
    MIB,
    RAW_SERVICE,
    READY_TIMEOUT_S,
    RECEIVER_NAME,
    ROUND,
    STOP_TIMEOUT_S,
    TOTAL_BYTES_KEY,
)
from tools.bench_transport.payload import VALIDATORS
from tools.bench_transport.resources import PeakRss, cpu_seconds, rss_bytes


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
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        try:
            receipt = await self.service.handle_push(start, chunks, caller)
        except BaseException as exc:
            self.probe.stop()
            self.reporter.send("error", {"error": f"{type(exc).__name__}: {exc}"})
            raise
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        before, peak = self.probe.stop()
        record = {"bytes": int(receipt.bytes_received), "seconds": seconds, "validate_s": self.timed.seconds,
                  "cpu_s": cpu, "rss_before": before,
                  "rss_peak": peak, "sender_known": caller.node_id in self.ctx.membership.members,
                  "caller": caller.node_id}
        self.reporter.transfer(record, lambda: self.ctx.inbox.take(ROUND))
        return receipt


async def _serve_mtls(spec: ReceiverSpec, reporter: _Reporter) -> tuple[str, Callable[[], Any]]:
    """A node context assembled as the daemon assembles one (fednode.node.assembly), serving the
    real PeerService."""
    from fednode.config import Config, LimitsSection, NodeSection, TlsSection
    from fednode.node.assembly import Compatibility, assemble_context, serve_peers
    from fednode.node.peer_service import PeerService
    from fednode.security.envelope import PayloadKey
    from fednode.security.identity import load_identity
    from fednode.security.trust import TrustStore
    from fednode.store.journal import Journal
    from fednode.transport.grpc_transport import GrpcTransport

    data_dir = Path(spec.workdir) / "receiver-data"
    cfg = Config(node=NodeSection(name=RECEIVER_NAME, data_dir=data_dir, listen="127.0.0.1:0"),
                 tls=TlsSection(ca=Path(spec.ca_path), cert=Path(spec.cert_path), key=Path(spec.key_path)),
                 limits=LimitsSection(max_payload_mib=spec.max_payload_mib, chunk_kib=spec.chunk_kib))
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
    journal = Journal.open(data_dir / "journal.db")
    transport = GrpcTransport(identity)
    ctx = assemble_context(cfg, identity, TrustStore(identity.ca_pem), journal,
                           PayloadKey.load_or_create(data_dir / "payload.key"), transport,
                           Compatibility(BENCH_TOKENIZER, BENCH_FAMILY))
    ctx.inbox.open(ROUND)
    timed = _TimedValidator(VALIDATORS[spec.validate])
    service = PeerService(ctx, timed)  # the node's gate (ctx.gate) counts and logs the refusals
    try:
        bound = await serve_peers(ctx, MeasuredPeerHandler(service, ctx, reporter, timed))
    except BaseException:
        journal.close()
        raise

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
        cpu0, t0 = cpu_seconds(), time.perf_counter()
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
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
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
            write_profile(profiler, Path(spec.profile_path))


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
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
