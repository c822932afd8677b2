"""A malicious member: it holds its own valid certificate from the mesh CA and speaks the real
protocol (mTLS gRPC, signed hellos and records, sealed envelopes), but says what an attacker wants.

Used by tests/test_insider_mesh.py against real daemons (`ProcessHarness`). Everything it sends is
well-formed and correctly signed with its own key, so what a daemon refuses it refuses for what the
message claims, not for how it is encoded. It runs its own asyncio loop in a thread, so tests call
it synchronously.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from fednode.errors import ProtocolError, Reason
from fednode.launcher import free_ports
from fednode.node.exchange import Recipient, fetch_state, push_update, serve_state
from fednode.security.ca import issue_node
from fednode.security.envelope import PayloadKey
from fednode.security.heartbeat import HeartbeatChain
from fednode.security.hello import sign_hello, verify_hello
from fednode.security.identity import load_identity
from fednode.security.trust import TrustStore
from fednode.store.atomic import sha256_file
from fednode.store.checkpoint import load_checkpoint, write_shared_checkpoint
from fednode.transport.base import OPEN_GATE, Caller, PeerCallError
from fednode.transport.grpc_transport import GrpcTransport
from fednode.v1 import peer_pb2 as pb


class Insider:
    """`Insider(pki_dir)` issues itself a certificate; `join(address)` makes it a member."""

    def __init__(self, pki_dir: Path, name: str = "mallory"):
        files = issue_node(Path(pki_dir), name, ["127.0.0.1", "localhost"])
        self.identity = load_identity(files.cert_path, files.key_path, files.ca_path)
        self.trust = TrustStore(self.identity.ca_pem)
        self.key = PayloadKey.generate()
        self.name = name
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        self.workdir = Path(tempfile.mkdtemp(prefix=f"insider-{name}-"))
        self.hello: pb.SignedHello | None = None
        self.peers: dict[str, pb.HelloBody] = {}  # node id -> its verified hello body
        self.heartbeat, self.seq = 1, 0
        self.chain = HeartbeatChain()  # our own heartbeats are proven like an honest node's
        self.claimed_round = 0
        self.negotiation: pb.SignedBlob | None = None
        self.state_file: tuple[Path, str, int] | None = None  # what FetchState serves: (path, sha, round)
        self.fetches_served = 0
        self.stall_fetch = False  # serve the first chunk of the state, then nothing (a stalled donor)
        self.ceiling = 3  # the ceiling our signed negotiation records claim
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.transport: GrpcTransport = self.run(self._make_transport())
        self._gossip_task: asyncio.Future | None = None
        self.lagging: frozenset[str] = frozenset()

    # ---- plumbing ----------------------------------------------------------------------------

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _make_transport(self) -> GrpcTransport:
        transport = GrpcTransport(self.identity)
        self.address = await transport.serve(_Handler(self), self.address, OPEN_GATE)  # the attacker admits anyone
        return transport

    def close(self) -> None:
        if self._gossip_task is not None:
            self._gossip_task.cancel()
        try:
            self.run(self.transport.close(0.2), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def __enter__(self) -> Insider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- membership --------------------------------------------------------------------------

    def join(self, address: str) -> pb.HelloBody:
        """Learn the mesh's hashes from a peer's digest, then handshake with a compatible hello."""
        return self.run(self._join(address))

    async def _join(self, address: str) -> pb.HelloBody:
        digest = await self.transport.gossip(address, pb.Digest(sender_id=self.name), 10)
        for record in digest.records:
            body = verify_hello(self.trust, record.hello)
            self.peers[body.node_id] = body
        template = next(iter(self.peers.values()))
        body = pb.HelloBody(node_id=self.name, protocol_version=template.protocol_version,
                            tokenizer_hash=template.tokenizer_hash, family_hash=template.family_hash,
                            payload_public_key=self.key.public_bytes(), address=self.address, incarnation=1,
                            heartbeat_anchor=self.chain.anchor, heartbeat_base=1)
        self.hello = sign_hello(self.identity, body)
        reply = await self.transport.handshake(address, self.hello, 10)
        victim = verify_hello(self.trust, reply)
        self.peers[victim.node_id] = victim
        return victim

    def body_of(self, node_id: str) -> pb.HelloBody:
        return self.peers[node_id]

    def record(self, *, heartbeat: int | None = None, last_round: int | None = None, left: bool = False,
               hello: pb.SignedHello | None = None) -> pb.PeerRecord:
        self.heartbeat += 1
        rec = pb.PeerRecord(hello=hello or self.hello, heartbeat=self.heartbeat if heartbeat is None else heartbeat,
                            left=left, last_round=self.claimed_round if last_round is None else last_round)
        if hello is None and 0 < rec.heartbeat - 1 <= self.chain.length:  # our own: proven (others': forged)
            rec.heartbeat_proof = self.chain.proof(rec.heartbeat - 1)
        if self.negotiation is not None and hello is None:
            rec.negotiation.CopyFrom(self.negotiation)
        return rec

    def sign_negotiation(self, **fields) -> pb.NegotiationRecord:
        """Our own NegotiationRecord with any fields (committed=pb.Agreement(...), round=..., ceiling=...)."""
        self.seq += 1
        rec = pb.NegotiationRecord(node_id=self.name, seq=self.seq, **fields)
        body = rec.SerializeToString(deterministic=True)
        self.negotiation = pb.SignedBlob(body=body, signature=self.identity.sign(body),
                                         certificate_der=self.identity.cert_der)
        return rec

    def gossip(self, address: str, records: list[pb.PeerRecord] | None = None) -> pb.Digest:
        """One Gossip call carrying our record (or the given ones); returns the peer's digest."""
        return self.run(self.transport.gossip(address, pb.Digest(sender_id=self.name,
                                                                  records=records or [self.record()]), 10))

    def keep_gossiping(self, addresses: list[str], interval: float = 0.4, mirror_round: bool = False,
                       lagging: frozenset[str] = frozenset()) -> None:
        """Keep our record fresh at every address (replacing an earlier loop); with `mirror_round`,
        claim (signed) the lowest round the peers not in `lagging` sign: that is the round a lagging
        node's catch-up targets, and claiming it exactly puts us first among its donors."""
        if self._gossip_task is not None:
            self._gossip_task.cancel()
        self.lagging = lagging

        async def one(address: str) -> None:
            try:
                digest = await self.transport.gossip(address, pb.Digest(sender_id=self.name,
                                                                        records=[self.record()]), 1.0)
            except PeerCallError:
                return
            if mirror_round:
                self._mirror(digest)

        async def loop() -> None:
            while True:  # concurrently: a paused peer must not hold the others' updates back
                await asyncio.gather(*(one(a) for a in addresses))
                await asyncio.sleep(interval)

        self._gossip_task = asyncio.run_coroutine_threadsafe(loop(), self._loop)

    def _mirror(self, digest: pb.Digest) -> None:
        rounds = []
        for record in digest.records:
            if record.HasField("negotiation"):
                try:
                    rec = pb.NegotiationRecord.FromString(record.negotiation.body)
                except Exception:  # noqa: BLE001
                    continue
                if rec.node_id not in self.lagging and rec.node_id != self.name:
                    rounds.append(rec.round)
        if not rounds:
            return
        best = min(rounds)
        if best != self.claimed_round or self.negotiation is None:
            self.claimed_round = best
            self.sign_negotiation(round=best, ceiling=self.ceiling)
            if self.state_file is not None:
                path, sha, _ = self.state_file
                self.state_file = (path, sha, best)

    # ---- payloads ----------------------------------------------------------------------------

    def recipient(self, node_id: str) -> Recipient:
        body = self.peers[node_id]
        return Recipient(node_id, body.address, bytes(body.payload_public_key))

    def push(self, node_id: str, tensors: dict[str, torch.Tensor], *, epoch: int = 0, round_: int,
             weight: float = 1.0, level: int = 0) -> int:
        """Seal and push an update; raises PeerCallError when the node refuses it."""
        return self.run(push_update(self.transport, self.identity, self.recipient(node_id), tensors, epoch=epoch,
                                    round_=round_, weight=weight, chunk_size=1 << 20, timeout=30, level=level))

    def fetch(self, node_id: str) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
        """The node's shared state, as a member may fetch it: (tensors, metadata, round)."""
        async def go():
            return await fetch_state(self.transport, [self.recipient(node_id)], requester=self.name, trust=self.trust,
                                     key=self.key, dest_dir=self.workdir / "in", min_round=0,
                                     max_payload=1 << 30, timeout=30)
        fetched = self.run(go())
        tensors, meta = load_checkpoint(fetched.path, fetched.sha256)
        fetched.path.unlink(missing_ok=True)
        return tensors, meta, fetched.round

    def fetch_flood(self, node_id: str, calls: int, concurrency: int = 6) -> dict[str, int]:
        """`calls` FetchState calls, `concurrency` at a time; outcome counts ("ok" or the refusal's reason)."""
        async def one(outcomes: dict[str, int]) -> None:
            request = pb.StateRequest(requester_id=self.name, min_round=0)
            try:
                async for _ in self.transport.fetch(self.recipient(node_id).address, request, 10):
                    pass
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except PeerCallError as exc:
                key = Reason.Name(exc.reason) if exc.reason else exc.code
                outcomes[key] = outcomes.get(key, 0) + 1

        async def go() -> dict[str, int]:
            outcomes: dict[str, int] = {}
            for start in range(0, calls, concurrency):
                await asyncio.gather(*(one(outcomes) for _ in range(min(concurrency, calls - start))))
            return outcomes

        return self.run(go(), timeout=300)

    def serve_state(self, tensors: dict[str, torch.Tensor] | None, *, level: int = 0, raw: bytes | None = None,
                    stall: bool = False) -> None:
        """What our FetchState serves from now on: a checkpoint of `tensors`, or `raw` bytes; with
        `stall`, only its first chunk, then the stream hangs until the caller gives up."""
        self.stall_fetch = stall
        directory = self.workdir / "serve"
        directory.mkdir(exist_ok=True)
        if raw is not None:
            path = directory / f"raw-{os.urandom(4).hex()}.bin"
            path.write_bytes(raw)
        else:
            name, _ = write_shared_checkpoint(directory, 1, tensors, {"round": "1", "node": self.name,
                                                                      "level": str(level), "mode": "adaptive"})
            path = directory / name
        self.state_file = (path, sha256_file(path), self.claimed_round)


class _Handler:
    """Our server side: answer handshakes and gossip, refuse pushes, serve the hostile state."""

    def __init__(self, insider: Insider):
        self.insider = insider

    async def handle_handshake(self, hello: pb.SignedHello, caller: Caller) -> pb.SignedHello:
        if self.insider.hello is None:
            raise ProtocolError(Reason.NOT_READY, "not joined yet")
        return self.insider.hello

    async def handle_gossip(self, digest: pb.Digest, caller: Caller) -> pb.Digest:
        if self.insider.hello is None:
            return pb.Digest(sender_id=self.insider.name)
        return pb.Digest(sender_id=self.insider.name, records=[self.insider.record()])

    async def handle_push(self, start: pb.EnvelopeStart, chunks: AsyncIterator[pb.Chunk],
                          caller: Caller) -> pb.Receipt:
        async for _ in chunks:
            pass
        return pb.Receipt(accepted=True)

    async def handle_fetch(self, request: pb.StateRequest, caller: Caller) -> AsyncIterator[pb.Chunk]:
        insider = self.insider
        if insider.state_file is None or request.requester_id not in insider.peers:
            raise ProtocolError(Reason.NO_STATE, "nothing to serve")
        path, sha, round_ = insider.state_file
        insider.fetches_served += 1
        async for chunk in serve_state(insider.identity, insider.recipient(request.requester_id), path, sha256=sha,
                                       round_=max(round_, 1), epoch=0, first_chunk=0,
                                       chunk_size=(1 << 12) if insider.stall_fetch else (1 << 20)):
            yield chunk
            if insider.stall_fetch:
                await asyncio.Event().wait()  # never set: hangs until the caller cancels the stream
