"""Real daemons on loopback: mesh formation, rounds, faults, hostile peers, durability.

One mesh of three `fednode run` processes (micro preset, tiny data) is shared by the tests in
this module, in order; each test waits on conditions with timeouts, never on bare sleeps.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fednode.errors import Reason
from fednode.launcher import LocalMesh, free_ports
from fednode.node.exchange import Recipient
from fednode.node.tensorstream import encode
from fednode.operator_client import fetch_peers
from fednode.security import tls
from fednode.security.ca import issue_node
from fednode.security.envelope import EnvelopeSealer
from fednode.security.hello import verify_hello
from fednode.security.identity import load_identity
from fednode.security.trust import TrustStore
from fednode.store.checkpoint import load_checkpoint, shared_name
from fednode.transport.base import PeerCallError
from fednode.transport.grpc_transport import GrpcTransport
from fednode.v1 import peer_pb2 as pb
from tools.harness.collect import read_rounds

FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 64, "max_tokens": 20_000},
    "train": {"steps_per_round": 2, "batch_size": 4, "round_timeout_s": 6.0, "threads": 1, "catchup_lag": 2},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
NAMES = ["node-0", "node-1", "node-2"]
START_TIMEOUT = 120.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    m = LocalMesh.create(root, 4, code_bytes=60_000, overrides=FAST)
    m.configure("node-3", "model", preset="tiny")  # an incompatible family, started by one test only
    m.configure("node-0", "metrics", listen=f"127.0.0.1:{free_ports(1)[0]}")
    m.configure("node-1", "mesh", reflection=True)  # off by default (node-0, node-2)
    with m.running(NAMES, START_TIMEOUT):
        yield m


def rounds_of(m: LocalMesh, name: str):
    return read_rounds(m.node(name).data_dir)


def round_now(m: LocalMesh, name: str) -> int:
    status = m.status(name)
    return int(status["round"]) if status else -1


def client(m: LocalMesh, name: str = "tester"):
    pki = m.workdir / "pki"
    files = issue_node(pki, name, ["127.0.0.1"])
    identity = load_identity(files.cert_path, files.key_path, files.ca_path)
    return identity, TrustStore(identity.ca_pem)


def test_mesh_forms_and_rounds_merge_peer_updates(mesh):
    for name in NAMES:
        mesh.wait(name, lambda s: int(s["round"]) >= 2, 60)
    for name in NAMES:
        records = rounds_of(mesh, name)
        rounds = [r.round for r in records]
        assert rounds == sorted(set(rounds))  # strictly increasing, never rewritten
        for prev, rec in zip(records, records[1:], strict=False):  # a gap only where the node caught up
            assert rec.round == prev.round + 1 or rec.source.startswith("fetched:"), (prev, rec)
        merged = [r for r in records if r.merged_from]
        assert merged, f"{name} never merged a peer update"
        assert set().union(*(set(r.merged_from) for r in merged)) <= set(NAMES) - {name}
        for r in records[-2:]:
            assert (mesh.node(name).data_dir / "checkpoints" / r.checkpoint).exists()
        status = mesh.status(name)
        assert status["bytes_sent"] and status["bytes_received"] and status["peers_alive"] == 2


def test_operator_cli_status_and_peers(mesh):
    node = mesh.node("node-0")
    out = subprocess.run([sys.executable, "-m", "fednode", "status", "--config", str(node.config_path), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["node_id"] == "node-0" and status["peers_alive"] == 2
    out = subprocess.run([sys.executable, "-m", "fednode", "peers", "--socket", str(node.socket)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "node-1" in out.stdout and "node-2" in out.stdout and "alive" in out.stdout


def test_prometheus_metrics_endpoint(mesh):
    import tomllib
    import urllib.request

    listen = tomllib.loads(mesh.node("node-0").config_path.read_text())["metrics"]["listen"]
    body = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    status = mesh.status("node-0")
    assert 'fednode_peers{state="alive"} 2.0' in body
    assert "fednode_round " in body and "fednode_bytes_sent_total{peer=" in body
    sent_round = next(float(line.split()[1]) for line in body.splitlines() if line.startswith("fednode_round "))
    assert sent_round >= 1 and int(status["round"]) >= sent_round


def test_health_and_reflection_are_served_over_mtls(mesh):
    identity, _ = client(mesh)
    creds = tls.channel_credentials(identity)
    with grpc.secure_channel(mesh.node("node-1").address, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                              timeout=10)
        services = {s.name for r in responses for s in r.list_services_response.service}
    assert {"fednode.v1.Peer", "grpc.health.v1.Health"} <= services
    with grpc.secure_channel(mesh.node("node-0").address, creds) as channel:  # the default: no reflection
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_client_without_certificate_is_refused_at_tls(mesh):
    with grpc.insecure_channel(mesh.node("node-0").address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def _sealed(identity, to: Recipient, tensors, round_: int, level: int = 0):
    encoded = encode(tensors)
    sealer = EnvelopeSealer(sender=identity, recipient_id=to.node_id, recipient_public_key=to.payload_public_key,
                            kind="update", epoch=0, round=round_, total_size=encoded.total_size,
                            chunk_size=4096, weight=1.0, level=level)
    chunks = [pb.Chunk(start=sealer.start)]
    pieces = list(encoded.chunks(4096))
    chunks += [pb.Chunk(index=i, data=sealer.seal(i, p), last=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    return chunks


async def _push_chunks(transport, address, chunks):
    async def gen():
        for c in chunks:
            yield c

    return await transport.push(address, gen(), timeout=20)


def test_hostile_pushes_get_typed_refusals_and_the_node_keeps_going(mesh):
    identity, trust = client(mesh, "intruder")
    target = mesh.node("node-0")
    records = rounds_of(mesh, "node-0")
    # what a peer may legitimately send: the shared (messenger) slice, at the level it was trained
    tensors, meta = load_checkpoint(target.data_dir / "checkpoints" / shared_name(records[-1].checkpoint))
    level = int(meta["level"])
    rejected_before = int(mesh.status("node-0")["rejected"])

    async def scenario():
        transport = GrpcTransport(identity)
        try:
            # learn node-0's payload key from a verified hello (as a peer would, via gossip)
            digest = await transport.gossip(target.address, pb.Digest(sender_id="intruder"), timeout=10)
            rec = next(r for r in digest.records if verify_hello(trust, r.hello).node_id == "node-0")
            to = Recipient("node-0", target.address, bytes(verify_hello(trust, rec.hello).payload_public_key))
            open_round = round_now(mesh, "node-0") + 1
            outcomes = {}

            tampered = _sealed(identity, to, tensors, open_round, level)
            tampered[1].data = bytes([tampered[1].data[0] ^ 1]) + tampered[1].data[1:]
            reordered = _sealed(identity, to, tensors, open_round, level)
            reordered[1], reordered[2] = reordered[2], reordered[1]
            truncated = _sealed(identity, to, tensors, open_round, level)[:-1]
            first = next(iter(tensors))
            not_finite = _sealed(identity, to, {**tensors, first: tensors[first] * float("nan")}, open_round, level)
            stale = _sealed(identity, to, tensors, 0, level)
            wrong_to = _sealed(identity, Recipient("node-1", target.address, to.payload_public_key), tensors,
                               open_round, level)
            for label, chunks in [("tampered", tampered), ("reordered", reordered), ("truncated", truncated),
                                  ("not_finite", not_finite), ("stale", stale), ("wrong_recipient", wrong_to)]:
                with pytest.raises(PeerCallError) as err:
                    await _push_chunks(transport, target.address, chunks)
                outcomes[label] = Reason.Name(err.value.reason) if err.value.reason else str(err.value)
            good = _sealed(identity, to, tensors, round_now(mesh, "node-0") + 1, level)
            receipt = await _push_chunks(transport, target.address, good)
            with pytest.raises(PeerCallError) as err:
                await _push_chunks(transport, target.address, good)  # the very same message again
            outcomes["replay"] = Reason.Name(err.value.reason) if err.value.reason else str(err.value)
            return outcomes, receipt
        finally:
            await transport.close()

    outcomes, receipt = asyncio.run(scenario())
    assert outcomes == {"tampered": "TAMPERED", "reordered": "OUT_OF_ORDER", "truncated": "TRUNCATED",
                        "not_finite": "NOT_FINITE", "stale": "STALE_ROUND", "wrong_recipient": "WRONG_RECIPIENT",
                        "replay": "REPLAY"}
    assert receipt.accepted
    status = mesh.wait("node-0", lambda s: int(s["rejected"]) >= rejected_before + 7, 10)
    start = int(status["round"])
    mesh.wait("node-0", lambda s: int(s["round"]) >= start + 1, 60)  # still making progress


def test_incompatible_node_is_refused_with_a_reason(mesh):
    mesh.start("node-3")  # tiny preset against a micro mesh: FAMILY_MISMATCH
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "FAMILY_MISMATCH" not in mesh.node("node-3").log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline, mesh.log_tail("node-3")
            assert mesh.procs["node-3"].poll() is None, mesh.log_tail("node-3")
            time.sleep(0.2)
        for name in NAMES:
            peers = {p["node_id"] for p in fetch_peers(mesh.node(name).socket)["peers"]}
            assert "node-3" not in peers
        assert mesh.status("node-3")["peers_alive"] == 0
    finally:
        assert mesh.stop("node-3") == 0


def test_straggler_does_not_block_rounds(mesh):
    mesh.signal("node-2", signal.SIGSTOP)
    try:
        start = {n: round_now(mesh, n) for n in ("node-0", "node-1")}
        for name in ("node-0", "node-1"):
            mesh.wait(name, lambda s, n=name: int(s["round"]) >= start[n] + 2, 60)
            peers = {p["node_id"]: p["state"] for p in fetch_peers(mesh.node(name).socket)["peers"]}
            assert peers["node-2"] in ("suspect", "dead")
    finally:
        mesh.signal("node-2", signal.SIGCONT)
    for name in ("node-0", "node-1"):
        mesh.wait(name, lambda s: s["peers_alive"] == 2, 30)


def test_kill9_restart_resumes_and_catches_up(mesh):
    victim = "node-1"
    mesh.kill(victim)
    before = {r.round: r.checkpoint_sha256 for r in rounds_of(mesh, victim)}
    last = max(before)
    for name in ("node-0", "node-2"):
        mesh.wait(name, lambda s: int(s["round"]) >= last + 3, 90)
    mesh.start(victim)
    mesh.wait(victim, lambda s: int(s["round"]) >= last + 3 and s["peers_alive"] == 2, START_TIMEOUT)
    after = rounds_of(mesh, victim)
    assert {r.round: r.checkpoint_sha256 for r in after if r.round <= last} == before  # nothing committed was lost
    fetched = [r for r in after if r.source.startswith("fetched:") and r.round > last]  # not a catch-up from before
    assert fetched and fetched[0].round >= last + 2, [(r.round, r.source) for r in after]


def test_sigterm_drains_and_peers_see_it_leave(mesh):
    code = mesh.stop("node-2", timeout=40)
    assert code == 0, mesh.log_tail("node-2")
    for name in ("node-0", "node-1"):
        deadline = time.monotonic() + 20
        while True:
            peers = {p["node_id"]: p["state"] for p in fetch_peers(mesh.node(name).socket)["peers"]}
            if peers.get("node-2") == "left":
                break
            assert time.monotonic() < deadline, peers
            time.sleep(0.2)


def test_restart_with_damaged_newest_checkpoint_falls_back(mesh):
    node = mesh.node("node-2")  # drained by the previous test
    records = rounds_of(mesh, "node-2")
    newest = node.data_dir / "checkpoints" / records[-1].checkpoint
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as after a bad disk
    mesh.start("node-2")
    status = mesh.wait("node-2", lambda s: int(s["round"]) >= records[-1].round + 1, START_TIMEOUT)
    assert int(status["round"]) > records[-1].round
    assert "damaged" in Path(node.log_path).read_text()
