"""Hostile network input against a real daemon process on loopback (`fednode run`, micro preset).

Each test sends something an attacker on the network, or a malicious member (holding a valid
mesh certificate), could send, and checks the typed answer, the counter, that the process stays
alive and keeps serving an honest peer, and where it matters that its memory stays bounded.
Tests wait on conditions with timeouts, never on bare sleeps. The rows of docs/reliability.md
point here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import socket
import ssl
import time
import tomllib
import urllib.request

import grpc
import psutil
import pytest
import torch

from fednode.errors import Reason
from fednode.launcher import LocalMesh, free_ports
from fednode.learning.messenger import LADDERS, level_shapes
from fednode.node.exchange import Recipient
from fednode.node.peer_service import MAX_PUSHES_PER_CALLER
from fednode.node.tensorstream import encode
from fednode.security.ca import _issue_node, issue_node
from fednode.security.envelope import EnvelopeSealer
from fednode.security.hello import verify_hello
from fednode.security.identity import load_identity
from fednode.security.trust import TrustStore
from fednode.transport.base import REASON_METADATA_KEY, PeerCallError
from fednode.transport.grpc_transport import GrpcTransport
from fednode.v1 import peer_pb2 as pb

ROUND_TIMEOUT_S = 3.0
PUSH_LIMIT_S = 2 * ROUND_TIMEOUT_S + 5.0  # peer_service: 2 x round_timeout_s + PUSH_TIME_SLACK_S
FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 64, "max_tokens": 20_000},
    "train": {"steps_per_round": 2, "batch_size": 4, "round_timeout_s": ROUND_TIMEOUT_S, "threads": 1},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
START_TIMEOUT = 120.0
SERVICE = "fednode.v1.Peer"


class Node:
    """One running daemon plus what a test needs to talk to it."""

    def __init__(self, mesh: LocalMesh):
        self.mesh = mesh
        self.spec = mesh.node("node-0")
        self.address = self.spec.address
        self.pki = mesh.workdir / "pki"
        self.metrics_listen = tomllib.loads(self.spec.config_path.read_text())["metrics"]["listen"]

    @property
    def proc(self) -> psutil.Process:
        return psutil.Process(self.mesh.procs["node-0"].pid)

    def alive(self) -> bool:
        return self.mesh.procs["node-0"].poll() is None

    def rss(self) -> int:
        return self.proc.memory_info().rss

    def status(self) -> dict:
        status = self.mesh.status("node-0")
        assert status is not None and self.alive(), self.mesh.log_tail("node-0")
        return status

    def metric(self, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(f"http://{self.metrics_listen}/metrics", timeout=10).read().decode()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else "")
        for line in body.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[1])
        return 0.0

    def rejected(self, reason: str) -> float:
        return self.metric("fednode_rejected_messages_total", reason=reason)

    def identity(self, name: str):
        files = issue_node(self.pki, name, ["127.0.0.1"])
        return load_identity(files.cert_path, files.key_path, files.ca_path)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    m = LocalMesh.create(tmp_path_factory.mktemp("hostile"), 1, code_bytes=30_000, overrides=FAST)
    m.configure("node-0", "metrics", listen=f"127.0.0.1:{free_ports(1)[0]}")
    m.configure("node-0", "mesh", seeds=[])
    m.prepare_tokenizer()
    m.start("node-0")
    try:
        m.wait("node-0", lambda s: int(s["round"]) >= 1, START_TIMEOUT)
        yield Node(m)
    finally:
        m.stop_all(timeout=20)


def honest_gossip(node: Node, name: str = "honest") -> pb.Digest:
    """What an honest member does: one Gossip call over mTLS. Fails the test if not served."""
    identity = node.identity(name) if isinstance(name, str) else name

    async def call() -> pb.Digest:
        transport = GrpcTransport(identity)
        try:
            return await transport.gossip(node.address, pb.Digest(sender_id=identity.node_id), timeout=10)
        finally:
            await transport.close()

    return asyncio.run(call())


def wait_for(what: str, predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --------------------------------------------------------------------------- below TLS


def test_garbage_bytes_on_the_peer_port_are_dropped_and_others_are_served(node):
    host, port = node.address.rsplit(":", 1)
    rng = random.Random(6)
    payloads = [
        rng.randbytes(64 * 1024),  # noise
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # plain HTTP/1
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(4096),  # cleartext HTTP/2 preface
        b"\x16\x03\x01\xff\xff" + rng.randbytes(8192),  # a TLS record header then garbage
        b"\x16\x03\x01\x00\x05" + b"\x01\x00\x00\x01\x00",  # a truncated ClientHello
    ]
    idle = []
    try:
        for _ in range(20):  # connections that never say anything, held open during the rest
            s = socket.create_connection((host, int(port)), timeout=5)
            idle.append(s)
        for payload in payloads:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                with contextlib.suppress(OSError):  # the server may close before all of it is written
                    s.sendall(payload)
                s.settimeout(10)
                try:
                    while s.recv(65536):  # the server answers (a TLS alert at most) and closes
                        pass
                except (ConnectionResetError, BrokenPipeError):
                    pass
        digest = honest_gossip(node)
        assert digest.sender_id == "node-0"
    finally:
        for s in idle:
            s.close()
    assert node.alive() and int(node.status()["round"]) >= 1


def test_a_tls_client_without_a_certificate_is_refused_and_others_are_served(node):
    host, port = node.address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(node.pki / "ca.crt"))
    context.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with context.wrap_socket(raw, server_hostname="node-0") as tls_sock:
                tls_sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                tls_sock.settimeout(10)
                while tls_sock.recv(4096):  # TLS 1.3: the refusal arrives after the handshake
                    pass
                raise ConnectionResetError("closed without an alert")
    assert honest_gossip(node).sender_id == "node-0"


def _mesh_signed_certificate(node: Node, name: str, not_before: dt.datetime, not_after: dt.datetime):
    files = _issue_node(node.pki, name, ["127.0.0.1"], not_before=not_before, not_after=not_after)
    return files.key_path.read_bytes(), files.cert_path.read_bytes(), files.ca_path.read_bytes()


@pytest.mark.parametrize("which", ["expired", "not_yet_valid"])
def test_a_certificate_outside_its_validity_is_refused_at_tls(node, which):
    now = dt.datetime.now(dt.UTC)
    if which == "expired":
        window = (now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    else:
        window = (now + dt.timedelta(days=1), now + dt.timedelta(days=30))
    key, cert, ca = _mesh_signed_certificate(node, f"cert-{which}", *window)  # signed by the mesh CA
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    with grpc.secure_channel(node.address, creds) as channel:
        call = channel.unary_unary(f"/{SERVICE}/Gossip", request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(pb.Digest(sender_id=f"cert-{which}").SerializeToString(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed: no RPC ran
    assert honest_gossip(node).sender_id == "node-0"


# --------------------------------------------------------------------------- random bytes for every RPC


def _peer_methods() -> list[tuple[str, bool, bool]]:
    service = pb.DESCRIPTOR.services_by_name["Peer"]
    return [(m.name, m.client_streaming, m.server_streaming) for m in service.methods]


def _random_messages(rng: random.Random, n: int) -> list[bytes]:
    out = [b"", b"\x00", b"\xff" * 64, rng.randbytes(1 << 16)]
    while len(out) < n:
        out.append(rng.randbytes(rng.choice([1, 3, 17, 200, 4096])))
    return out


def test_every_peer_rpc_with_random_bytes_gets_a_status_and_the_node_lives(node):
    identity = node.identity("fuzzer")
    creds = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                         certificate_chain=identity.cert_pem)
    rng = random.Random(61)
    methods = _peer_methods()
    assert {m[0] for m in methods} == {"Handshake", "Gossip", "PushMessenger", "FetchState"}
    seen: dict[str, set[str]] = {}
    before = int(node.status()["rejected"])
    with grpc.secure_channel(node.address, creds, options=[("grpc.max_send_message_length", 32 << 20)]) as channel:
        for name, client_streaming, server_streaming in methods:
            path = f"/{SERVICE}/{name}"
            for message in _random_messages(rng, 24):
                try:
                    if client_streaming:
                        stream = [message] + [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(0, 3))]
                        channel.stream_unary(path)(iter(stream), timeout=15)
                    elif server_streaming:
                        list(channel.unary_stream(path)(message, timeout=15))
                    else:
                        channel.unary_unary(path)(message, timeout=15)
                    outcome = "OK"
                except grpc.RpcError as err:
                    reason = dict(err.trailing_metadata() or ()).get(REASON_METADATA_KEY)
                    outcome = f"{err.code().name}/{reason}"
                    # every refusal is typed, undecodable requests included (MALFORMED: the transport's
                    # lenient deserializers hand them to the servicer instead of gRPC answering UNKNOWN)
                    assert reason is not None, (name, message[:40], err.code(), err.details())
                seen.setdefault(name, set()).add(outcome)
    assert node.alive()
    for name in ("Handshake", "Gossip", "PushMessenger", "FetchState"):
        assert any(o.endswith("/MALFORMED") for o in seen[name]), (name, seen[name])  # undecodable: typed
    assert int(node.status()["rejected"]) > before  # refusals by the node's handlers are counted
    assert honest_gossip(node).sender_id == "node-0"
    assert int(node.status()["round"]) >= 1


# --------------------------------------------------------------------------- a malicious member's pushes


class Intruder:
    """A mesh member (valid certificate) that sends what it likes."""

    def __init__(self, node: Node, name: str = "intruder"):
        self.node = node
        self.identity = node.identity(name)
        self.trust = TrustStore(self.identity.ca_pem)

    async def target(self, transport: GrpcTransport) -> Recipient:
        digest = await transport.gossip(self.node.address, pb.Digest(sender_id=self.identity.node_id), timeout=10)
        for record in digest.records:
            body = verify_hello(self.trust, record.hello)
            if body.node_id == "node-0":
                return Recipient("node-0", self.node.address, bytes(body.payload_public_key))
        raise AssertionError("node-0 did not gossip its own record")

    def sealer(self, to: Recipient, total_size: int, *, round_: int | None = None, chunk_size: int = 4096,
               level: int = 0) -> EnvelopeSealer:
        if round_ is None:
            round_ = int(self.node.status()["round"]) + 1
        return EnvelopeSealer(sender=self.identity, recipient_id=to.node_id, recipient_public_key=to.payload_public_key,
                              kind="update", epoch=0, round=round_, total_size=total_size, chunk_size=chunk_size,
                              weight=1.0, level=level)

    def sealed(self, to: Recipient, tensors: dict[str, torch.Tensor], *, level: int = 0) -> list[pb.Chunk]:
        encoded = encode(tensors)
        sealer = self.sealer(to, encoded.total_size, level=level)
        pieces = list(encoded.chunks(4096))
        return [pb.Chunk(start=sealer.start)] + [
            pb.Chunk(index=i, data=sealer.seal(i, p), last=i == len(pieces) - 1) for i, p in enumerate(pieces)]


async def _stream(chunks):
    for chunk in chunks:
        yield chunk


def _level0() -> dict[str, torch.Tensor]:
    return {k: torch.randn(s) * 0.01 for k, s in level_shapes(LADDERS["micro"], 0).items()}


def _push_outcomes(node: Node, cases: dict[str, object]) -> dict[str, str]:
    intruder = Intruder(node)

    async def scenario() -> dict[str, str]:
        transport = GrpcTransport(intruder.identity)
        try:
            to = await intruder.target(transport)
            out = {}
            for label, make in cases.items():
                chunks = make(intruder, to)
                try:
                    await transport.push(node.address, _stream(chunks), timeout=30)
                    out[label] = "ACCEPTED"
                except PeerCallError as err:
                    out[label] = Reason.Name(err.reason) if err.reason else err.code
            return out
        finally:
            await transport.close()

    return asyncio.run(scenario())


def test_updates_that_do_not_fit_the_model_are_refused_and_the_node_keeps_training(node):
    tensors = _level0()
    name = next(iter(tensors))

    def reshaped(i, to):
        bad = dict(tensors)
        bad[name] = torch.zeros(bad[name].shape[0] + 1, *bad[name].shape[1:])
        return i.sealed(to, bad)

    def extra_tensor(i, to):
        return i.sealed(to, {**tensors, "model.extra.weight": torch.zeros(4)})

    def huge_norm(i, to):
        return i.sealed(to, {**tensors, name: torch.full_like(tensors[name], 1e5)})

    def integer_dtype(i, to):  # right shapes, wrong dtype: must not reach the merge
        return i.sealed(to, {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in tensors.items()})

    def wrong_level(i, to):
        return i.sealed(to, tensors, level=99)

    def signed_by_another_member(i, to):
        chunks = i.sealed(to, tensors)
        other = node.identity("bystander")  # a real member's certificate, but not the signer's
        chunks[0].start.sender_certificate_der = other.cert_der
        return chunks

    def header_naming_another_sender(i, to):
        encoded = encode(tensors)
        sealer = i.sealer(to, encoded.total_size)
        header = pb.EnvelopeHeader.FromString(sealer.start.header)
        header.sender_id = "bystander"
        forged = header.SerializeToString(deterministic=True)
        start = pb.EnvelopeStart(header=forged, signature=i.identity.sign(forged),
                                 sender_certificate_der=i.identity.cert_der)
        return [pb.Chunk(start=start), pb.Chunk(index=0, data=b"x" * 32, last=True)]

    def duplicate_chunk(i, to):
        chunks = i.sealed(to, tensors)
        return chunks[:2] + [chunks[1]] + chunks[2:]

    def gap(i, to):
        chunks = i.sealed(to, tensors)
        return chunks[:2] + chunks[3:]

    rounds_before = int(node.status()["round"])
    outcomes = _push_outcomes(node, {
        "reshaped": reshaped, "extra_tensor": extra_tensor, "huge_norm": huge_norm,
        "integer_dtype": integer_dtype, "wrong_level": wrong_level,
        "signed_by_another_member": signed_by_another_member,
        "header_naming_another_sender": header_naming_another_sender,
        "duplicate_chunk": duplicate_chunk, "gap": gap,
    })
    assert outcomes == {
        "reshaped": "SHAPE_MISMATCH", "extra_tensor": "SHAPE_MISMATCH", "huge_norm": "MALFORMED",
        "integer_dtype": "SHAPE_MISMATCH", "wrong_level": "BAD_LEVEL",
        "signed_by_another_member": "BAD_SIGNATURE", "header_naming_another_sender": "BAD_CERTIFICATE",
        "duplicate_chunk": "OUT_OF_ORDER", "gap": "OUT_OF_ORDER",
    }
    # nothing refused reached a merge: the node commits further rounds (a poisoned merge would crash it)
    node.mesh.wait("node-0", lambda s: int(s["round"]) >= rounds_before + 3, 60)
    assert node.alive()


def test_an_update_announcing_more_than_the_model_can_hold_is_oversize_before_any_allocation(node):
    rss_before = node.rss()

    def announce(total: int):
        def make(i, to):
            sealer = i.sealer(to, total, chunk_size=1 << 20)
            return [pb.Chunk(start=sealer.start), pb.Chunk(index=0, data=b"\0" * 64, last=False)]
        return make

    outcomes = _push_outcomes(node, {"one_gib": announce(1 << 30), "max_payload": announce(8192 << 20)})
    assert outcomes == {"one_gib": "OVERSIZE", "max_payload": "OVERSIZE"}
    assert node.rss() - rss_before < 256 << 20, (rss_before, node.rss())


def test_a_single_message_over_the_receive_ceiling_is_refused_by_grpc(node):
    identity = node.identity("big-sender")
    creds = grpc.ssl_channel_credentials(root_certificates=identity.ca_pem, private_key=identity.key_pem,
                                         certificate_chain=identity.cert_pem)
    rss_before = node.rss()
    huge = pb.Digest(sender_id="big-sender", revocation_list=b"\0" * (18 << 20)).SerializeToString()
    with grpc.secure_channel(node.address, creds, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(f"/{SERVICE}/Gossip")(huge, timeout=20)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            chunk = pb.Chunk(index=0, data=b"\0" * (18 << 20)).SerializeToString()
            with pytest.raises(grpc.RpcError) as err:
                channel.stream_unary(f"/{SERVICE}/PushMessenger")(iter([chunk]), timeout=20)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert node.rss() - rss_before < 256 << 20
    assert honest_gossip(node).sender_id == "node-0"


def test_an_endless_push_stream_is_cut_and_memory_stays_bounded(node):
    intruder = Intruder(node, "endless")
    tensors = _level0()
    rss_before = node.rss()

    async def scenario() -> tuple[str, int, str, float]:
        transport = GrpcTransport(intruder.identity)
        try:
            to = await intruder.target(transport)
            # 1. a complete update, then chunks forever after the last one
            chunks = intruder.sealed(to, tensors)
            sent = 0

            async def forever():
                nonlocal sent
                for c in chunks:
                    yield c
                while True:
                    sent += 1
                    yield pb.Chunk(index=len(chunks) + sent, data=b"\0" * 65536)

            with pytest.raises(PeerCallError) as err:
                await transport.push(node.address, forever(), timeout=60)
            # the node's OUT_OF_ORDER status can lose its trailers to the reset of a stream that is
            # still being written (see grpc_transport._drain); the counter below says who ended it
            after_last = Reason.Name(err.value.reason) if err.value.reason else "OUT_OF_ORDER?"

            # 2. a valid start, one chunk, then silence with no client deadline: the node cuts it
            sealer = intruder.sealer(to, 3 * 4096)

            async def stall():
                yield pb.Chunk(start=sealer.start)
                yield pb.Chunk(index=0, data=sealer.seal(0, b"\0" * 4096))
                await asyncio.Event().wait()

            began = time.monotonic()
            stub_call = transport._stub(node.address).PushMessenger(stall())  # no timeout at all
            try:
                await asyncio.wait_for(stub_call, PUSH_LIMIT_S + 30)
                stalled = "ACCEPTED"
            except grpc.aio.AioRpcError as exc:
                stalled = dict(exc.trailing_metadata() or ()).get(REASON_METADATA_KEY, exc.code().name)
            return after_last, sent, stalled, time.monotonic() - began
        finally:
            await transport.close()

    out_of_order = node.rejected("OUT_OF_ORDER")
    after_last, sent, stalled, took = asyncio.run(scenario())
    assert after_last in ("OUT_OF_ORDER", "OUT_OF_ORDER?")
    assert node.rejected("OUT_OF_ORDER") == out_of_order + 1
    assert sent < 70_000  # the refusal drains at most 65,536 chunks / 3 s, then the stream is closed
    assert stalled == "TRUNCATED" and took < PUSH_LIMIT_S + 10, (stalled, took)
    assert node.rss() - rss_before < 256 << 20
    assert honest_gossip(node).sender_id == "node-0"


def test_concurrent_pushes_from_one_member_are_bounded(node):
    intruder = Intruder(node, "parallel")

    async def scenario() -> list[str]:
        transport = GrpcTransport(intruder.identity)
        try:
            to = await intruder.target(transport)
            release = asyncio.Event()

            async def held(sealer):
                yield pb.Chunk(start=sealer.start)
                await release.wait()

            sealers = [intruder.sealer(to, 2 * 4096) for _ in range(MAX_PUSHES_PER_CALLER + 3)]
            calls = [asyncio.create_task(transport.push(node.address, held(s), timeout=30)) for s in sealers]
            done, _ = await asyncio.wait(calls, timeout=20, return_when=asyncio.FIRST_COMPLETED)
            assert done, "no push was refused while the others were held open"
            await asyncio.sleep(0.5)  # let every other refusal arrive too (bounded)
            release.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
            return sorted(Reason.Name(r.reason) if isinstance(r, PeerCallError) and r.reason else type(r).__name__
                          for r in results)
        finally:
            await transport.close()

    outcomes = asyncio.run(scenario())
    assert outcomes.count("RATE_LIMITED") == 3, outcomes
    assert node.metric("fednode_rate_limited_total", peer="parallel", rpc="PushMessenger") == 3


# --------------------------------------------------------------------------- a gossip flood


def test_a_gossip_flood_from_one_member_is_rate_limited_and_others_are_served(node):
    flooder = node.identity("flooder")
    honest = node.identity("honest-2")

    async def scenario() -> tuple[dict[str, int], int]:
        flood_t, honest_t = GrpcTransport(flooder), GrpcTransport(honest)
        try:
            outcomes: dict[str, int] = {}

            async def one() -> None:
                try:
                    await flood_t.gossip(node.address, pb.Digest(sender_id="flooder"), timeout=10)
                    key = "OK"
                except PeerCallError as err:
                    key = f"{err.code}/{Reason.Name(err.reason) if err.reason else ''}"
                outcomes[key] = outcomes.get(key, 0) + 1

            for _ in range(6):
                await asyncio.gather(*(one() for _ in range(50)))
            served = 0
            for _ in range(5):  # meanwhile an honest member gossips normally
                await honest_t.gossip(node.address, pb.Digest(sender_id="honest-2"), timeout=10)
                served += 1
            return outcomes, served
        finally:
            await flood_t.close()
            await honest_t.close()

    before = node.rejected("RATE_LIMITED")
    outcomes, served = asyncio.run(scenario())
    limited = outcomes.get("RESOURCE_EXHAUSTED/RATE_LIMITED", 0)
    assert served == 5
    assert limited >= 100 and set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED/RATE_LIMITED"}, outcomes
    wait_for("the refusals to be counted", lambda: node.rejected("RATE_LIMITED") >= before + limited, 10)
    assert node.metric("fednode_rate_limited_total", peer="flooder", rpc="Gossip") == limited
    assert node.metric("fednode_rate_limited_total", peer="honest-2", rpc="Gossip") == 0


def test_the_node_survived_everything(node):
    status = node.status()
    assert node.alive() and int(status["round"]) >= 1 and int(status["rejected"]) > 0
    # gRPC logs a traceback for a request that does not decode as its message type (it decodes
    # before our handlers see it); any other traceback would be a crash in the node's own code
    tracebacks = [line for line in node.spec.log_path.read_text(errors="replace").splitlines()
                  if "Traceback" in line and "google.protobuf.message.DecodeError" not in line]
    assert not tracebacks, tracebacks[:3]
    flood_lines = node.spec.log_path.read_text(errors="replace").count("too many gossip calls from flooder")
    assert flood_lines <= 2  # a flood is counted, not logged line by line
