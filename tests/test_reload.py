"""SIGHUP reload: config and certificates change under a running node without dropping peers.

In-process (Daemon.reload() on a node served in this event loop) for the rules, then real
daemons (`fednode run` processes, SIGHUP) for the operator's view: same PID, rounds go on, peers
stay alive, a fresh TLS client sees the new certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import signal
import socket
import ssl
import time
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from fednode.config import Config, load_config, to_toml
from fednode.launcher import LocalMesh
from fednode.node.daemon import Daemon, expiry_warning
from fednode.node.peer_service import fetch_limiter, gossip_limiter
from fednode.node.reload import LIVE_KEYS, split_reload
from fednode.operator_client import fetch_peers
from fednode.security.ca import _issue_node, init_ca, issue_node
from fednode.security.identity import load_identity
from fednode.security.revocation import CRL_FILE, revoke_certificate
from fednode.store.journal import Journal

FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 64, "max_tokens": 20_000},
    "train": {"steps_per_round": 2, "batch_size": 4, "round_timeout_s": 6.0, "threads": 1, "catchup_lag": 2},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
START_TIMEOUT = 120.0


def served_serial(address: str, pki_dir: Path, client: str = "node-0") -> int:
    """The serial of the certificate a node presents to a brand-new mTLS client (a fresh TCP + TLS
    handshake, so no connection opened before a reload can answer)."""
    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki_dir / "ca.crt")
    context.load_cert_chain(pki_dir / f"{client}.crt", pki_dir / f"{client}.key")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as conn:
        der = conn.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def rewrite(path: Path, section: str, **values) -> None:
    raw = tomllib.loads(path.read_text())
    raw.setdefault(section, {}).update(values)
    path.write_text(to_toml(raw))


# ------------------------------------------------------------------------------------------ rules

# Every live key (fednode.node.reload.LIVE_KEYS, [tls] aside: steps 1, 4 and 5 of
# test_reload_in_process swap certificates and lists) with a new value and what reads it in the
# part that owns it, so a key that reloads into the config but not into its owner fails here.
LIVE_PROBES = {
    ("mesh", "seeds"): (["127.0.0.9:7799"], lambda d: "127.0.0.9:7799" in d.gossiper.seeds),
    ("mesh", "gossip_interval_s"): (0.2, lambda d: d.gossiper.interval == 0.2
                                    and _limits(d)[0] == gossip_limiter(0.2).rate),
    ("mesh", "suspect_after_s"): (2.5, lambda d: d.ctx.membership.suspect_after == 2.5),
    ("mesh", "dead_after_s"): (6.5, lambda d: d.ctx.membership.dead_after == 6.5),
    ("mesh", "fanout"): (4, lambda d: d.gossiper.fanout == 4),
    ("limits", "max_payload_mib"): (3, lambda d: d.ctx.max_payload == 3 << 20),  # state fetches and pushes
    ("limits", "chunk_kib"): (48, lambda d: d.ctx.chunk_size == 48 << 10),  # every stream it sends
    ("train", "round_timeout_s"): (9.0, lambda d: _limits(d)[1] == fetch_limiter(9.0).rate),
    ("train", "catchup_lag"): (5, lambda d: d.rounds.catchup_lag == 5),
    ("train", "keep_checkpoints"): (2, lambda d: d.rounds.keep_checkpoints == 2),
    ("log", "level"): ("debug", lambda d: logging.getLogger().level == logging.DEBUG),
}


def _limits(daemon: Daemon) -> tuple[float, float]:
    """The peer service's gossip and fetch rates in force, after the next call would resize them."""
    service = daemon.peer_service
    service._follow_reload()
    return service.gossip_limit.rate, service.fetch_limit.rate


def test_every_live_key_has_a_probe_of_its_owner():
    live = {(section, key) for section, keys in LIVE_KEYS.items() if section != "tls"
            for key in (keys if keys is not None else [f.name for f in dataclasses.fields(getattr(Config(), section))])}
    assert live == set(LIVE_PROBES)


def test_reflection_is_not_live(tmp_path):
    """The reflection service is registered when the listener starts: a reload cannot turn it on."""
    old = Config()
    new = dataclasses.replace(old, mesh=dataclasses.replace(old.mesh, reflection=True))
    applied, live, restart = split_reload(old, new)
    assert not applied.mesh.reflection and restart == ["[mesh] reflection"] and live == []


def test_split_reload_applies_live_keys_and_lists_the_rest(tmp_path):
    path = tmp_path / "n.toml"
    path.write_text(to_toml({"node": {"name": "n", "listen": "127.0.0.1:7700"}, "mesh": {"fanout": 2}}))
    old = load_config(path)
    rewrite(path, "node", listen="127.0.0.1:7800")
    rewrite(path, "mesh", fanout=3, seeds=["127.0.0.1:7701"])
    rewrite(path, "train", round_timeout_s=9.0, steps_per_round=5)
    rewrite(path, "model", preset="micro")
    applied, live, restart = split_reload(old, load_config(path))
    assert live == ["[mesh] seeds", "[mesh] fanout", "[train] round_timeout_s"]
    assert restart == ["[node] listen", "[model] preset", "[train] steps_per_round"]
    assert applied.mesh.fanout == 3 and applied.train.round_timeout_s == 9.0
    assert applied.node == old.node and applied.model == old.model  # kept until a restart
    assert applied.train.steps_per_round == old.train.steps_per_round
    assert split_reload(old, old)[1:] == ([], [])


def test_expiry_warning_starts_30_days_ahead(tmp_path):
    init_ca(tmp_path)
    files = issue_node(tmp_path, "n1", ["127.0.0.1"], days=365)
    identity = load_identity(files.cert_path, files.key_path, files.ca_path)
    assert expiry_warning(identity) is None
    soon = identity.not_after - dt.timedelta(days=10)
    warning = expiry_warning(identity, now=soon)
    assert warning and "expires in 10.0 days" in warning and "fednode ca issue" in warning


# ---------------------------------------------------------------------------------- in-process


def test_reload_in_process(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    mesh = LocalMesh.create(tmp_path, 1, code_bytes=30_000, overrides=FAST)
    node = mesh.node("node-0")
    pki_dir = tmp_path / "pki"
    rewrite(node.config_path, "node", listen="127.0.0.1:0")
    cfg = load_config(node.config_path)

    def messages(level: int = logging.INFO) -> str:
        return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= level)

    async def scenario() -> None:
        daemon = Daemon(cfg)
        task = asyncio.create_task(daemon.serve())
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + START_TIMEOUT
            while not daemon._serving:
                assert not task.done(), task.exception() if task.done() else ""
                assert loop.time() < deadline, "daemon did not start"
                await asyncio.sleep(0.05)
            ctx = daemon.ctx
            address = ctx.own_body.address
            old = ctx.identity
            assert await asyncio.to_thread(served_serial, address, pki_dir, "node-0") == old.certificate.serial_number

            # 1. a re-issued certificate: served to new handshakes, hello re-signed, expiry follows
            issue_node(pki_dir, "node-0", ["127.0.0.1", "localhost"], days=30)
            new_serial = serial_of(pki_dir / "node-0.crt")
            assert await daemon.reload()
            assert ctx.identity.certificate.serial_number == new_serial
            assert ctx.own_hello.certificate_der == ctx.identity.cert_der
            assert ctx.membership.self_member.hello == ctx.own_hello
            assert ctx.own_hello.body == ctx.membership.self_member.hello.body  # same body: nothing bumped
            assert await asyncio.to_thread(served_serial, address, pki_dir, "node-0") == new_serial
            expiry = ctx.metrics.registry.get_sample_value("fednode_certificate_expiry_seconds")
            assert 29 * 86400 < expiry < 31 * 86400
            assert "certificate reloaded" in messages()

            # 2. a broken config file: nothing applied, one line naming the key
            good = node.config_path.read_text()
            node.config_path.write_text(good + "\n[mesh]\nfanout = 3\n")  # duplicate table: invalid TOML
            running = ctx.cfg
            caplog.clear()
            assert not await daemon.reload()
            assert ctx.cfg is running and daemon.cfg is running
            assert "config not applied" in messages(logging.ERROR) and "not valid TOML" in messages(logging.ERROR)
            node.config_path.write_text(good.replace("[mesh]\n", "[mesh]\nfanout = 5\n", 1) + "[nde]\n")
            caplog.clear()
            assert not await daemon.reload()
            assert "unknown section [nde]" in messages(logging.ERROR) and ctx.cfg.mesh.fanout == 2

            # 3. live keys apply, others are reported as needing a restart
            node.config_path.write_text(good)
            rewrite(node.config_path, "mesh", fanout=5, dead_after_s=7.0)
            rewrite(node.config_path, "model", seed=3)
            caplog.clear()
            assert await daemon.reload()
            assert ctx.cfg.mesh.fanout == 5 and ctx.membership.dead_after == 7.0
            assert ctx.cfg.model.seed == 0
            assert "needs restart to apply: [model] seed" in messages(logging.WARNING)

            # 4. an expired certificate: refused, the running one kept
            kept = ctx.identity
            backup = {p: p.read_bytes() for p in (pki_dir / "node-0.crt", pki_dir / "node-0.key")}
            now = dt.datetime.now(dt.UTC)
            _issue_node(pki_dir, "node-0", ["127.0.0.1"], not_before=now - dt.timedelta(days=10),
                        not_after=now - dt.timedelta(days=1))
            caplog.clear()
            await daemon.reload()
            assert ctx.identity is kept
            error = messages(logging.ERROR)
            assert "certificates not changed" in error and "expired" in error and "fednode ca issue" in error
            for p, data in backup.items():
                p.write_bytes(data)

            # 5. a revocation list in [tls] crl: adopted and kept; one that revokes this node is refused
            issue_node(pki_dir, "other", ["127.0.0.1"])
            revoke_certificate(pki_dir, "other")
            rewrite(node.config_path, "tls", crl=str(pki_dir / CRL_FILE))
            assert await daemon.reload()
            assert ctx.trust.revocation is not None and ctx.trust.revocation.number == 1
            assert (node.data_dir / CRL_FILE).exists()
            revoke_certificate(pki_dir, "node-0")
            caplog.clear()
            await daemon.reload()
            assert ctx.identity is kept and ctx.trust.revocation.number == 1
            assert "is revoked by the mesh CA" in messages(logging.ERROR)

            # 6. every live key reaches the part that owns it (the log level only where the daemon
            # owns the process: as `fednode run` does)
            daemon._owns_process = True
            root_level = logging.getLogger().level
            try:
                for (section, key), (value, applied) in LIVE_PROBES.items():
                    rewrite(node.config_path, section, **{key: value})
                    assert await daemon.reload(), f"[{section}] {key}"
                    assert applied(daemon), f"[{section}] {key} = {value!r} reloaded but its owner runs on without it"
            finally:
                daemon._owns_process = False
                logging.getLogger().setLevel(root_level)
            assert not task.done()
        finally:
            daemon.request_drain()
            await asyncio.wait_for(task, 60)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------- real daemons

NAMES = ("node-0", "node-1", "node-2")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = LocalMesh.create(tmp_path_factory.mktemp("reload"), 3, code_bytes=60_000, overrides=FAST)
    with m.running(NAMES, START_TIMEOUT):
        yield m


def wait_for(what: str, predicate, timeout: float, on_timeout=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; {on_timeout()}"
        time.sleep(0.25)


def log_since(m: LocalMesh, name: str, offset: int) -> str:
    return m.node(name).log_path.read_bytes()[offset:].decode(errors="replace")


def test_sighup_serves_a_reissued_certificate_without_a_restart(mesh):
    import subprocess
    import sys

    pki_dir = mesh.workdir / "pki"
    node = mesh.node("node-1")
    pid = mesh.procs["node-1"].pid
    old_serial = serial_of(pki_dir / "node-1.crt")
    assert served_serial(node.address, pki_dir) == old_serial
    before = mesh.status("node-1")
    assert float(before["cert_expires_in_s"]) > 300 * 86400

    out = subprocess.run([sys.executable, "-m", "fednode", "ca", "issue", "--dir", str(pki_dir), "node-1",
                          "--addr", "127.0.0.1,localhost", "--days", "30"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    new_serial = serial_of(pki_dir / "node-1.crt")
    assert new_serial != old_serial
    offset = node.log_path.stat().st_size
    mesh.signal("node-1", signal.SIGHUP)

    status = mesh.wait("node-1", lambda s: float(s["cert_expires_in_s"]) < 31 * 86400, 30)
    assert served_serial(node.address, pki_dir) == new_serial  # a fresh client sees the new certificate
    assert "certificate reloaded" in log_since(mesh, "node-1", offset)
    # no restart: same process, uptime and rounds carry on, peers never dropped it
    assert mesh.procs["node-1"].poll() is None and mesh.procs["node-1"].pid == pid
    assert float(status["uptime_s"]) >= float(before["uptime_s"])
    mark = int(status["round"])
    mesh.wait("node-1", lambda s: int(s["round"]) >= mark + 2 and s["peers_alive"] == 2, 90)
    for name in ("node-0", "node-2"):
        peers = {p["node_id"]: p["state"] for p in fetch_peers(mesh.node(name).socket)["peers"]}
        assert peers["node-1"] == "alive"

    # node-0 still merges node-1's updates, now signed under the new certificate
    def merged_new_update() -> bool:
        journal = Journal.open(mesh.node("node-0").data_dir / "journal.db")
        try:
            return any("node-1" in r.merged_from for r in journal.rounds() if r.round > mark)
        finally:
            journal.close()

    wait_for("node-0 to merge an update of the reloaded node-1", merged_new_update, 90,
             lambda: mesh.log_tail("node-0"))


def test_sighup_with_a_broken_config_keeps_the_old_one(mesh):
    node = mesh.node("node-2")
    pid = mesh.procs["node-2"].pid
    good = node.config_path.read_text()
    node.config_path.write_text(good.replace("[mesh]\n", "[mesh]\nfanuot = 3\n", 1))
    offset = node.log_path.stat().st_size
    try:
        mesh.signal("node-2", signal.SIGHUP)
        wait_for("the reload error", lambda: "config not applied" in log_since(mesh, "node-2", offset), 30,
                 lambda: mesh.log_tail("node-2"))
        line = next(line for line in log_since(mesh, "node-2", offset).splitlines() if "config not applied" in line)
        assert "unknown key [mesh] fanuot" in line and "did you mean 'fanout'" in line
        mark = int(mesh.status("node-2")["round"])
        mesh.wait("node-2", lambda s: int(s["round"]) >= mark + 2 and s["peers_alive"] == 2, 90)
        assert mesh.procs["node-2"].poll() is None and mesh.procs["node-2"].pid == pid
    finally:
        node.config_path.write_text(good)
    # fixed and reloaded again: applied, still the same process
    offset = node.log_path.stat().st_size
    mesh.signal("node-2", signal.SIGHUP)
    wait_for("the reload", lambda: '"msg":"reloaded"' in log_since(mesh, "node-2", offset), 30,
             lambda: mesh.log_tail("node-2"))
    assert mesh.procs["node-2"].poll() is None


def test_sighup_tells_systemd_reloading_then_ready(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    single = LocalMesh.create(tmp_path / "mesh", 1, code_bytes=30_000, overrides=FAST)

    def read_until(want: str, timeout: float) -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while want not in seen:
            assert time.monotonic() < deadline, f"{want} not received; got {seen}"
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                seen += sock.recv(4096).decode().splitlines()
            except TimeoutError:
                pass
        return seen

    try:
        single.start("node-0")
        read_until("READY=1", START_TIMEOUT)
        single.signal("node-0", signal.SIGHUP)
        lines = read_until("RELOADING=1", 30)
        assert any(line.startswith("MONOTONIC_USEC=") for line in lines)
        assert "READY=1" in read_until("READY=1", 30)
        assert single.procs["node-0"].poll() is None and single.status("node-0") is not None
    finally:
        single.stop_all(timeout=10)
        sock.close()
