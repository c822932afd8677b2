"""The daemon: assemble a node from its config, run it, drain it.

Start-up order matters for operators: everything that can fail on bad input (config, data dir
lock, certificates, journal, checkpoints) is checked before the node serves, so a bad setup
exits non-zero with one line instead of half-joining the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import fcntl
import functools
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fednode.config import Config, Mode, load_config
from fednode.errors import ConfigError, NetworkError, PkiError, ProtocolError, StoreError
from fednode.node.assembly import Compatibility, assemble_context, serve_peers
from fednode.node.context import NodeContext, Phase
from fednode.node.gossiper import Gossiper
from fednode.node.learner import build_learner, measure_ceiling
from fednode.node.negotiator import Negotiator
from fednode.node.operator_service import start_operator_server
from fednode.node.peer_service import PeerService
from fednode.node.reload import split_reload
from fednode.node.rounds import RoundLoop
from fednode.observability import sdnotify
from fednode.security.envelope import PayloadKey
from fednode.security.hello import sign_hello
from fednode.security.identity import EXPIRY_WARN_DAYS, NodeIdentity, load_identity
from fednode.security.revocation import (
    CRL_FILE,
    RevocationList,
    load_revocation_list,
    serial_hex,
    verify_revocation_list,
)
from fednode.security.trust import TrustStore
from fednode.store.atomic import write_atomic
from fednode.store.checkpoint import latest_good_round
from fednode.store.journal import Journal
from fednode.transport.base import Transport
from fednode.transport.faults import wrap_from_env
from fednode.transport.grpc_transport import GrpcTransport

log = logging.getLogger(__name__)
DRAIN_BOUND_S = 30.0
EXPIRY_CHECK_EVERY_S = 12 * 3600.0

def expiry_warning(identity: NodeIdentity, now: dt.datetime | None = None) -> str | None:
    """The warning to log when the node's certificate expires within EXPIRY_WARN_DAYS, else None."""
    left = identity.not_after - (now or dt.datetime.now(dt.UTC))
    if left > dt.timedelta(days=EXPIRY_WARN_DAYS):
        return None
    return (f"certificate of {identity.node_id} expires in {left.total_seconds() / 86400:.1f} days "
            f"({identity.not_after:%Y-%m-%d %H:%M} UTC): re-issue it with `fednode ca issue`, install it and "
            f"reload (SIGHUP)")


def load_revocations(cfg: Config, trust: TrustStore, identity: NodeIdentity) -> RevocationList | None:
    """At start: put the newest of the kept list (DATA_DIR/revoked.crl) and the configured one
    ([tls] crl) in force, keep it in the data dir, and refuse to start under a revoked certificate."""
    kept_path = cfg.node.data_dir / CRL_FILE
    kept = None
    if kept_path.exists():
        try:
            kept = load_revocation_list(kept_path, trust.cas, what="kept revocation list")
        except PkiError as exc:  # e.g. written under a CA that was replaced since: not fatal, not trusted
            log.warning("%s; ignoring it", exc)
    configured = load_revocation_list(cfg.tls.crl, trust.cas) if cfg.tls.crl is not None else None
    for candidate in (kept, configured):
        if candidate is not None:
            trust.consider_revocation_list(candidate.der)
    revocation = trust.revocation
    if revocation is None:
        return None
    serial = identity.certificate.serial_number
    if revocation.revokes(serial):
        where = cfg.tls.crl if revocation is configured else kept_path
        raise PkiError(f"certificate {cfg.tls.cert} (serial {serial_hex(serial)}) is revoked by the mesh CA "
                       f"(revocation list #{revocation.number}, {where}): issue a new one with `fednode ca issue "
                       f"--dir {Path(cfg.tls.ca).parent} {identity.node_id} --addr ...`, install it and start again")
    if kept is None or revocation.der != kept.der:
        write_atomic(kept_path, revocation.pem(), 0o644)
    log.info("revocation list in force", extra={"number": revocation.number, "revoked": len(revocation.serials)})
    return revocation


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

    def __init__(self, cfg: Config, transport_factory: Callable[[NodeIdentity], Transport] | None = None, *,
                 exit_when_done: bool = False):
        """`exit_when_done`: once [train] rounds are committed, drain and exit 0 (batch jobs) instead of
        serving peers until drained."""
        self.cfg = cfg
        self.exit_when_done = exit_when_done
        # FEDNODE_FAULTS (tests and benchmarks) wraps the real transport in a fault injector
        self.transport_factory = transport_factory or wrap_from_env(
            functools.partial(GrpcTransport, reflection=cfg.mesh.reflection))
        self.ctx: NodeContext | None = None
        self._servers: list = []
        self._tasks: list[asyncio.Task] = []
        self._drain_requested = asyncio.Event()
        self.gossiper: Gossiper | None = None
        self.peer_service: PeerService | None = None
        self._lock = None
        self._metrics_server: Any = None  # prometheus_client's WSGIServer once listening
        self.notifier: sdnotify.Notifier | None = None  # only run() talks to systemd: serve() may host many nodes
        self._serving = False  # start() finished: a reload may run
        self._owns_process = False  # run(): signals and the process-wide log level are ours
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()

    @property
    def serving(self) -> bool:
        """Started: ports bound, gossip and rounds running (a reload may run from now on)."""
        return self._serving

    async def start(self) -> NodeContext:
        cfg = self.cfg
        self._lock = lock_data_dir(cfg.node.data_dir)
        identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
        trust = TrustStore(identity.ca_pem)
        load_revocations(cfg, trust, identity)  # before the journal: a revoked node changes nothing on disk
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
        ctx = assemble_context(cfg, identity, trust, journal, payload_key, transport,
                               Compatibility(learner.info.tokenizer_hash, learner.info.family_hash))
        self.ctx = ctx
        ceiling = await asyncio.to_thread(measure_ceiling, cfg, learner)
        self.negotiator = Negotiator(ctx, ceiling=ceiling, max_level=learner.top_level,
                                     enabled=learner.mode is Mode.ADAPTIVE)
        self.negotiator.restore()
        self._restore(ctx)

        self.peer_service = PeerService(ctx, learner.validate, learner.update_spec())
        bound = await serve_peers(ctx, self.peer_service)
        self._servers.append(await start_operator_server(ctx, learner, self.negotiator, cfg.operator_socket,
                                                         self.request_drain))
        if cfg.metrics.listen:
            self._start_metrics(ctx)
        # follows reloads
        ctx.metrics.cert_expiry.set_function(lambda: ctx.identity.not_after.timestamp() - time.time())
        if (warning := expiry_warning(identity)) is not None:
            log.warning(warning)
        seeds = list(cfg.mesh.seeds) + [p["address"] for p in journal.peers()]
        self.gossiper = Gossiper(ctx, seeds)
        self.rounds = RoundLoop(ctx, learner, self.negotiator)
        log.info("serving", extra={"address": bound, "round": ctx.committed_round, "seeds": len(seeds)})
        return ctx

    def _restore(self, ctx: NodeContext) -> None:
        last = ctx.journal.last_round()
        if last is None:
            return
        found = latest_good_round(ctx.journal, ctx.checkpoint_dir)
        if found is None:
            raise StoreError(f"journal says round {last.round} was committed but no checkpoint in "
                             f"{ctx.checkpoint_dir} is intact (newest: {last.checkpoint}): restore the data "
                             f"dir from backup")
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

        listen = self.cfg.metrics.listen
        host, _, port = listen.rpartition(":")
        try:
            server, thread = start_http_server(int(port), addr=host, registry=ctx.metrics.registry)
        except OSError as exc:  # a port in use must not end in a traceback (and five systemd restarts)
            raise NetworkError(f"[metrics] listen {listen}: cannot listen ({exc.strerror or exc}): free the port "
                               f"or choose another in [metrics] listen (empty turns the endpoint off)") from None
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
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)  # systemctl reload
        self._owns_process = True
        self.notifier = sdnotify.Notifier.from_env()
        try:
            return await self._serve()
        finally:
            await self.close()

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading config and certificates")
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def reload(self) -> bool:
        """Re-read the config file and the certificates, CA and revocation list it names, and apply
        what can change while running, without dropping peers: the listener stays up, new TLS
        handshakes get the new certificate, client channels are recreated, the hello is re-signed.
        Fail-safe: a config or certificate that does not load is logged (one line: the problem and
        the fix) and the running one kept. True when the reload was applied (even partly)."""
        ctx = self.ctx
        if ctx is None or not self._serving:
            log.warning("reload requested before the node serves: ignored; send SIGHUP again once it serves")
            return False
        async with self._reload_lock:
            if self.notifier is not None:
                self.notifier.reloading()
            try:
                return self._reload(ctx)
            except Exception:  # a reload must never take the node down
                log.exception("reload failed unexpectedly: the node keeps its running config and certificates")
                return False
            finally:
                if self.notifier is not None:
                    self.notifier.ready(self.status_text())

    def _reload(self, ctx: NodeContext) -> bool:
        old = self.cfg
        if old.source is None:
            new = old  # an embedded config has no file to re-read: certificates only
        else:
            try:
                new = load_config(Path(old.source))
            except ConfigError as exc:
                log.error("reload: config not applied, the node keeps its running config: %s", exc)
                return False
        applied, live, restart = split_reload(old, new)
        if "[log] level" in live and not self._owns_process:  # embedded nodes share the process' log level
            live.remove("[log] level")
            restart.append("[log] level")
            applied = dataclasses.replace(applied, log=old.log)
        tls_changed = [k for k in live if k.startswith("[tls]")]
        if not self._reload_tls(ctx, applied):
            applied = dataclasses.replace(applied, tls=old.tls)
            live = [k for k in live if k not in tls_changed]
        self.cfg = ctx.cfg = applied
        ctx.membership.suspect_after = applied.mesh.suspect_after_s
        ctx.membership.dead_after = applied.mesh.dead_after_s
        if self.gossiper is not None:
            self.gossiper.set_seeds(list(applied.mesh.seeds) + [p["address"] for p in ctx.journal.peers()])
        if self._owns_process and applied.log.level != old.log.level:
            logging.getLogger().setLevel(applied.log.level.upper())
        log.info("reloaded", extra={"applied": ", ".join(live) or "nothing changed",
                                    "round": ctx.committed_round})
        if restart:
            log.warning("reload: needs restart to apply: %s (the node keeps running with the old values)",
                        ", ".join(restart))
        return True

    def _reload_tls(self, ctx: NodeContext, cfg: Config) -> bool:
        """Load and check the certificate, key, CA and revocation list named by `cfg`, then switch to
        them. On any problem log one line and keep the running ones (False)."""
        try:
            identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
            if identity.node_id != ctx.node_id:
                raise PkiError(f"certificate {cfg.tls.cert} is for {identity.node_id!r}, not {ctx.node_id!r}: install "
                               f"this node's certificate (the node name needs a restart to change)")
            cas = TrustStore(identity.ca_pem).cas
            configured = load_revocation_list(cfg.tls.crl, cas) if cfg.tls.crl is not None else None
            in_force = ctx.trust.revocation
            if in_force is not None and identity.ca_pem != ctx.identity.ca_pem:
                try:  # a list the new CA did not sign is dropped when the CA changes (set_ca_pem below)
                    verify_revocation_list(in_force.der, cas)
                except ProtocolError:
                    in_force = None
            newest = max((r for r in (in_force, configured) if r is not None), key=lambda r: r.version, default=None)
            serial = identity.certificate.serial_number
            if newest is not None and newest.revokes(serial):
                raise PkiError(f"certificate {cfg.tls.cert} (serial {serial_hex(serial)}) is revoked by the mesh CA "
                               f"(revocation list #{newest.number}): issue a new one with `fednode ca issue --dir "
                               f"{Path(cfg.tls.ca).parent} {ctx.node_id} --addr ...` and reload again")
            changed = (identity.cert_der, identity.key_pem, identity.ca_pem) != (
                ctx.identity.cert_der, ctx.identity.key_pem, ctx.identity.ca_pem)
            if changed:
                ctx.transport.set_identity(identity)  # the last check (credentials build) before anything changes
        except PkiError as exc:
            log.error("reload: certificates not changed, the node keeps its running ones: %s", exc)
            return False
        if identity.ca_pem != ctx.identity.ca_pem and not ctx.trust.set_ca_pem(identity.ca_pem):
            log.warning("the revocation list in force was not signed by the new mesh CA: dropped")
        if changed:
            ctx.identity = identity
            ctx.membership.announce(sign_hello(identity, ctx.own_body))  # same body (and version): a new certificate
            log.info("certificate reloaded", extra={"serial": serial_hex(serial),
                                                    "expires": f"{identity.not_after:%Y-%m-%d %H:%M} UTC"})
            if (warning := expiry_warning(identity)) is not None:
                log.warning(warning)
        if configured is not None and not ctx.offer_revocation_list(configured.der, str(cfg.tls.crl)):
            current = ctx.trust.revocation
            if current is not None and current.der != configured.der:
                log.info("revocation list %s (#%d) is not newer than the one in force (#%d): kept #%d",
                         cfg.tls.crl, configured.number, current.number, current.number)
        return True

    async def _expiry_watch(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_EVERY_S)
            ctx = self.ctx
            if ctx is not None and (warning := expiry_warning(ctx.identity)) is not None:
                log.warning(warning)

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
        self._serving = True
        helpers: list[asyncio.Task] = [asyncio.create_task(self._expiry_watch(), name="expiry-watch")]
        if self.notifier is not None:  # READY only now: ports bound, certificates loaded, gossip running
            self.notifier.ready(self.status_text())
            helpers += [asyncio.create_task(sdnotify.watchdog_loop(self.notifier, sdnotify.watchdog_interval(),
                                                                  lambda: not gossip_task.done())),
                       asyncio.create_task(sdnotify.status_loop(self.notifier, self.status_text))]
        try:
            return await self._until_drained(ctx, gossip_task, rounds_task)
        finally:
            self._serving = False
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
            if self.exit_when_done:
                log.info("all rounds done: draining and exiting (--exit-when-done)",
                         extra={"round": ctx.committed_round})
            else:
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
        self._serving = False
        ctx, self.ctx = self.ctx, None
        for task in list(self._background):
            task.cancel()
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
