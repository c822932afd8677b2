"""The daemon: assemble a node from its config, run it, drain it.

Start-up order matters for operators: everything that can fail on bad input (config, data dir
lock, certificates, journal, checkpoints) is checked before the node serves, so a bad setup
exits non-zero with one line instead of half-joining the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

from fednode import PROTOCOL_VERSION
from fednode.config import Config
from fednode.errors import ConfigError, StoreError
from fednode.mesh.membership import Membership
from fednode.node.context import NodeContext, Phase
from fednode.node.gossiper import Gossiper
from fednode.node.learner import build_learner, measure_ceiling
from fednode.node.negotiator import Negotiator
from fednode.node.operator_service import start_operator_server
from fednode.node.peer_service import PeerService
from fednode.node.rounds import RoundLoop
from fednode.observability import sdnotify
from fednode.observability.metrics import NodeMetrics
from fednode.security.envelope import PayloadKey
from fednode.security.hello import sign_hello
from fednode.security.pki import NodeIdentity, TrustStore, load_identity
from fednode.store.checkpoint import latest_good_round
from fednode.store.journal import Journal
from fednode.transport.base import Transport
from fednode.transport.grpc_transport import GrpcTransport
from fednode.v1 import peer_pb2 as pb

log = logging.getLogger(__name__)
DRAIN_BOUND_S = 30.0


def lock_data_dir(data_dir: Path):
    """Hold an exclusive lock for the daemon's lifetime: two daemons on one data dir corrupt it."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = open(data_dir / "lock", "a+")
    except OSError as exc:
        raise StoreError(f"cannot use data dir {data_dir} ({exc.strerror}): check [node] data_dir and its "
                         f"permissions") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(f"data dir {data_dir} is in use by another fednode process: stop it first, or give "
                         f"this node its own [node] data_dir") from None
    return handle


class Daemon:
    """A node. `transport_factory` (identity -> Transport) defaults to real mTLS gRPC; simulations
    pass the in-memory twin so many full nodes run in one process."""

    def __init__(self, cfg: Config, transport_factory: Callable[[NodeIdentity], Transport] | None = None):
        self.cfg = cfg
        self.transport_factory = transport_factory or GrpcTransport
        self.ctx: NodeContext | None = None
        self._servers: list = []
        self._tasks: list[asyncio.Task] = []
        self._drain_requested = asyncio.Event()
        self.gossiper: Gossiper | None = None
        self._lock = None
        self._metrics_server = None
        self.notifier: sdnotify.Notifier | None = None  # only run() talks to systemd: serve() may host many nodes

    async def start(self) -> NodeContext:
        cfg = self.cfg
        self._lock = lock_data_dir(cfg.node.data_dir)
        identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
        trust = TrustStore(identity.ca_pem)
        journal = Journal.open(cfg.node.data_dir / "journal.db")
        shutil.rmtree(cfg.node.data_dir / "incoming", ignore_errors=True)  # partial state fetches of a past run
        payload_key = PayloadKey.load_or_create(cfg.node.data_dir / "payload.key")
        if identity.node_id != cfg.node.name:
            raise ConfigError(f"[node] name is {cfg.node.name!r} but the certificate {cfg.tls.cert} is for "
                              f"{identity.node_id!r}: set name = \"{identity.node_id}\" or issue a certificate "
                              f"for {cfg.node.name!r}")
        learner = await asyncio.to_thread(build_learner, cfg)
        self.learner = learner

        transport = self.transport_factory(identity)
        metrics = NodeMetrics(identity.node_id)
        body = pb.HelloBody(node_id=identity.node_id, protocol_version=PROTOCOL_VERSION,
                            tokenizer_hash=learner.info.tokenizer_hash, family_hash=learner.info.family_hash,
                            payload_public_key=payload_key.public_bytes(), address=cfg.advertise,
                            incarnation=journal.next_incarnation(), issued_unix_ms=int(time.time() * 1000))
        membership = Membership(pb.SignedHello(), body, trust, suspect_after=cfg.mesh.suspect_after_s,
                                dead_after=cfg.mesh.dead_after_s)
        ctx = NodeContext(cfg, identity, trust, payload_key, journal, membership, transport, metrics,
                          own_hello=pb.SignedHello(), own_body=body)
        self.ctx = ctx
        ceiling = await asyncio.to_thread(measure_ceiling, cfg, learner)
        self.negotiator = Negotiator(ctx, ceiling=ceiling, max_level=learner.top_level,
                                     enabled=learner.mode == "adaptive")
        self.negotiator.restore()
        self._restore(ctx)

        service = PeerService(ctx, learner.validate)
        bound = await transport.serve(service, cfg.node.listen)
        if cfg.advertise.endswith(":0"):
            body.address = bound
        hello = sign_hello(identity, body)
        ctx.own_hello = hello
        membership.self_member.hello = hello
        membership.self_member.body = body
        membership.tick(last_round=ctx.committed_round)
        self._servers.append(await start_operator_server(ctx, cfg.operator_socket, self.request_drain))
        if cfg.metrics.listen:
            self._start_metrics(ctx)
        expires_at = identity.not_after.timestamp()
        metrics.cert_expiry.set_function(lambda: expires_at - time.time())
        seeds = list(cfg.mesh.seeds) + [p["address"] for p in journal.peers()]
        self.gossiper = Gossiper(ctx, seeds)
        self.rounds = RoundLoop(ctx, learner, self.negotiator)
        ctx.negotiator = self.negotiator
        ctx.learner = learner
        log.info("serving", extra={"address": bound, "round": ctx.committed_round, "seeds": len(seeds)})
        return ctx

    def _restore(self, ctx: NodeContext) -> None:
        last = ctx.journal.last_round()
        if last is None:
            return
        found = latest_good_round(ctx.journal, ctx.checkpoint_dir)
        if found is None:
            raise StoreError(f"journal says round {last.round} was committed but no checkpoint in "
                             f"{ctx.checkpoint_dir} is intact: restore the data dir from backup")
        record, tensors, meta = found
        self.learner.restore(tensors, meta)
        ctx.committed_round = last.round
        if record.round != last.round:
            log.warning("newest checkpoint is damaged: resumed the model of an older round; the node will catch up "
                        "from peers", extra={"round": last.round, "restored_round": record.round})
        ctx.last_loss = record.loss_after
        ctx.metrics.round.set(last.round)
        log.info("resumed from journal", extra={"round": last.round})

    def _start_metrics(self, ctx: NodeContext) -> None:
        from prometheus_client import start_http_server

        host, _, port = self.cfg.metrics.listen.rpartition(":")
        server, thread = start_http_server(int(port), addr=host, registry=ctx.metrics.registry)
        self._metrics_server = server

    def request_drain(self) -> None:
        if self.ctx is not None:
            self.ctx.draining = True
        self._drain_requested.set()

    async def run(self) -> int:
        """Serve until drained (SIGTERM/SIGINT/operator Drain). Returns the exit code."""
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def on_signal() -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("second signal: forcing exit")
                os._exit(1)  # state on disk is only ever replaced atomically, so this is safe
            self.request_drain()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        # Until live reload lands, SIGHUP (systemctl reload) must not kill the node: say what to do instead.
        loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
            "SIGHUP: live reload is not implemented yet; restart the node to apply config or certificate changes"))
        self.notifier = sdnotify.Notifier.from_env()
        try:
            return await self._serve()
        finally:
            await self.close()

    async def serve(self) -> int:
        """Run without installing signal handlers (for embedding several nodes in one loop)."""
        try:
            return await self._serve()
        finally:
            await self.close()

    async def _serve(self) -> int:
        ctx = await self.start()
        assert self.gossiper is not None
        gossip_task = asyncio.create_task(self.gossiper.run(), name="gossip")
        rounds_task = asyncio.create_task(self.rounds.run(), name="rounds")
        helpers: list[asyncio.Task] = []
        if self.notifier is not None:  # READY only now: ports bound, certificates loaded, gossip running
            self.notifier.ready(self.status_text())
            helpers = [asyncio.create_task(sdnotify.watchdog_loop(self.notifier, sdnotify.watchdog_interval(),
                                                                  lambda: not gossip_task.done())),
                       asyncio.create_task(sdnotify.status_loop(self.notifier, self.status_text))]
        try:
            return await self._until_drained(ctx, gossip_task, rounds_task)
        finally:
            for task in helpers:
                task.cancel()

    def status_text(self) -> str:
        """The systemd STATUS= line: phase, round, level, live/known peers."""
        ctx = self.ctx
        if ctx is None:
            return "stopped"
        counts = ctx.membership.counts()
        return sdnotify.status_line(ctx.phase.value, ctx.committed_round, ctx.level, counts["alive"],
                                    sum(counts.values()))

    async def _until_drained(self, ctx: NodeContext, gossip_task: asyncio.Task, rounds_task: asyncio.Task) -> int:
        assert self.gossiper is not None
        drain_task = asyncio.create_task(self._drain_requested.wait(), name="drain")
        await asyncio.wait({rounds_task, drain_task}, return_when=asyncio.FIRST_COMPLETED)
        if rounds_task.done() and rounds_task.exception() is not None:
            self.gossiper.stop.set()
            raise rounds_task.exception()  # type: ignore[misc]
        if not self._drain_requested.is_set():
            log.info("all rounds done: still serving peers until drained", extra={"round": ctx.committed_round})
            await self._drain_requested.wait()
        ctx.phase = Phase.DRAINING
        if self.notifier is not None:
            self.notifier.stopping(self.status_text())
        log.info("draining", extra={"round": ctx.committed_round})
        try:
            await asyncio.wait_for(asyncio.shield(rounds_task), DRAIN_BOUND_S)
        except TimeoutError:
            rounds_task.cancel()
        self.gossiper.stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.gossiper.say_goodbye(), 3.0)
        await gossip_task
        log.info("stopped", extra={"round": ctx.committed_round})
        return 0

    async def close(self) -> None:
        """Idempotent: stop servers, close the journal, release the data-dir lock."""
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            ctx.phase = Phase.STOPPED
            await ctx.transport.close(grace=1.0)
            for server in self._servers:
                await server.stop(0.5)
            self._servers.clear()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            ctx.journal.close()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
