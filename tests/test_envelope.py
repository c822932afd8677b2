"""Payload envelopes and signed Hellos: round trips, and every kind of tampering is refused."""

from __future__ import annotations

import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_pki import make_mesh

from fednode.errors import PkiError, ProtocolError, Reason
from fednode.security.envelope import EnvelopeOpener, EnvelopeSealer, PayloadKey
from fednode.security.hello import check_compatible, sign_hello, verify_hello
from fednode.security.trust import TrustStore
from fednode.v1 import peer_pb2

CHUNK = 1024


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    root = tmp_path_factory.mktemp("mesh")
    nodes = make_mesh(root, ("alice", "bob", "carol"))
    foreign = make_mesh(tmp_path_factory.mktemp("foreign"), ("alice",))["alice"]
    return {**nodes, "foreign": foreign, "trust": TrustStore(nodes["alice"].ca_pem),
            "bob_key": PayloadKey.generate()}


def _seal(mesh, payload: bytes, *, sender="alice", first_chunk=0, **kw):
    sealer = EnvelopeSealer(sender=mesh[sender], recipient_id="bob",
                            recipient_public_key=mesh["bob_key"].public_bytes(), kind="update", epoch=3,
                            round=7, total_size=len(payload), chunk_size=CHUNK, first_chunk=first_chunk,
                            **kw)
    chunks = []
    for i in range(first_chunk, sealer.header.chunk_count):
        chunks.append((i, sealer.seal(i, payload[i * CHUNK:(i + 1) * CHUNK]),
                       i == sealer.header.chunk_count - 1))
    return sealer, chunks


def _opener(mesh, start, **kw):
    kw.setdefault("recipient_id", "bob")
    kw.setdefault("recipient_key", mesh["bob_key"])
    return EnvelopeOpener(start, trust=mesh["trust"], **kw)


def _reason(err: pytest.ExceptionInfo) -> str:
    return Reason.Name(err.value.reason)


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17])
def test_round_trip(mesh, size):
    payload = os.urandom(size)
    sealer, chunks = _seal(mesh, payload, weight=2.5, content_sha256="ab" * 32)
    assert sealer.header.chunk_count == max(1, -(-size // CHUNK)) == len(chunks)
    assert len(sealer.header.message_id) == 16
    opener = _opener(mesh, sealer.start)
    assert opener.sender_id == "alice"
    assert opener.header.epoch == 3 and opener.header.round == 7 and opener.header.weight == 2.5
    assert opener.header.message_id == sealer.header.message_id
    out = b"".join(opener.open(i, data, last) for i, data, last in chunks)
    opener.finish()
    assert out == payload
    assert all(payload[:16] not in data for _, data, _ in chunks if size >= 16)


def test_each_envelope_uses_a_fresh_key_and_message_id(mesh):
    payload = b"x" * 100
    a, [(_, ca, _)] = _seal(mesh, payload)
    b, [(_, cb, _)] = _seal(mesh, payload)
    assert a.header.message_id != b.header.message_id
    assert a.header.ephemeral_public_key != b.header.ephemeral_public_key
    assert ca != cb


def test_open_into_writes_into_the_callers_buffer(mesh):
    payload = os.urandom(3 * CHUNK + 5)
    sealer, chunks = _seal(mesh, payload)
    opener = _opener(mesh, sealer.start)
    buf = bytearray(len(payload))
    view = memoryview(buf)
    pos = 0
    for i, data, last in chunks:
        pos += opener.open_into(i, data, last, view[pos:])
    opener.finish()
    assert pos == len(payload) and bytes(buf) == payload


def test_open_into_zeroes_the_buffer_when_a_chunk_is_tampered(mesh):
    payload = os.urandom(CHUNK)
    sealer, [(i, data, last)] = _seal(mesh, payload)
    bad = bytearray(data)
    bad[10] ^= 1
    buf = bytearray(b"\xff" * CHUNK)
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, sealer.start).open_into(i, bytes(bad), last, memoryview(buf))
    assert _reason(err) == "TAMPERED" and buf == bytes(CHUNK)


def test_a_flipped_ciphertext_byte_is_tampered(mesh):
    sealer, chunks = _seal(mesh, os.urandom(3 * CHUNK))
    opener = _opener(mesh, sealer.start)
    opener.open(*chunks[0])
    i, data, last = chunks[1]
    bad = bytearray(data)
    bad[-1] ^= 0x80  # in the tag
    with pytest.raises(ProtocolError) as err:
        opener.open(i, bytes(bad), last)
    assert _reason(err) == "TAMPERED"


def test_swapped_chunks_are_out_of_order(mesh):
    sealer, chunks = _seal(mesh, os.urandom(3 * CHUNK))
    opener = _opener(mesh, sealer.start)
    with pytest.raises(ProtocolError) as err:
        opener.open(*chunks[1])
    assert _reason(err) == "OUT_OF_ORDER"
    # relabelling chunk 1's ciphertext as index 0 does not help: the index is in the nonce
    with pytest.raises(ProtocolError) as err:
        opener.open(0, chunks[1][1], False)
    assert _reason(err) == "TAMPERED"


def test_a_replayed_chunk_is_out_of_order(mesh):
    sealer, chunks = _seal(mesh, os.urandom(2 * CHUNK))
    opener = _opener(mesh, sealer.start)
    opener.open(*chunks[0])
    with pytest.raises(ProtocolError) as err:
        opener.open(*chunks[0])
    assert _reason(err) == "OUT_OF_ORDER"
    opener.open(*chunks[1])
    with pytest.raises(ProtocolError) as err:
        opener.open(2, chunks[1][1], True)
    assert _reason(err) == "OUT_OF_ORDER"


def test_dropping_the_last_chunk_is_truncated(mesh):
    sealer, chunks = _seal(mesh, os.urandom(3 * CHUNK))
    opener = _opener(mesh, sealer.start)
    for chunk in chunks[:-1]:
        opener.open(*chunk)
    with pytest.raises(ProtocolError) as err:
        opener.finish()
    assert _reason(err) == "TRUNCATED"


def test_a_lying_last_flag_is_refused(mesh):
    sealer, chunks = _seal(mesh, os.urandom(3 * CHUNK))
    opener = _opener(mesh, sealer.start)
    i, data, _ = chunks[0]
    with pytest.raises(ProtocolError) as err:
        opener.open(i, data, True)  # claims to end early
    assert _reason(err) == "TRUNCATED"
    opener.open(*chunks[0])
    opener.open(*chunks[1])
    i, data, _ = chunks[2]
    with pytest.raises(ProtocolError) as err:
        opener.open(i, data, False)  # hides that it is the end
    assert _reason(err) == "OUT_OF_ORDER"


def test_a_wrong_length_chunk_is_malformed(mesh):
    sealer, chunks = _seal(mesh, os.urandom(2 * CHUNK))
    i, data, last = chunks[0]
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, sealer.start).open(i, data[:-1], last)
    assert _reason(err) == "MALFORMED"


def test_a_header_changed_after_signing_is_a_bad_signature(mesh):
    sealer, _ = _seal(mesh, os.urandom(CHUNK))
    header = peer_pb2.EnvelopeHeader.FromString(sealer.start.header)
    header.recipient_id = "carol"
    forged = peer_pb2.EnvelopeStart(header=header.SerializeToString(deterministic=True),
                                    signature=sealer.start.signature,
                                    sender_certificate_der=sealer.start.sender_certificate_der)
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, forged, recipient_id="carol")
    assert _reason(err) == "BAD_SIGNATURE"


def test_a_header_signed_for_another_sender_is_a_bad_certificate(mesh):
    sealer, _ = _seal(mesh, os.urandom(CHUNK))
    header = peer_pb2.EnvelopeHeader.FromString(sealer.start.header)
    header.sender_id = "carol"  # alice pretends to be carol, signing with her own key
    data = header.SerializeToString(deterministic=True)
    start = peer_pb2.EnvelopeStart(header=data, signature=mesh["alice"].sign(data),
                                   sender_certificate_der=mesh["alice"].cert_der)
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, start)
    assert _reason(err) == "BAD_CERTIFICATE"


def test_a_wrong_recipient_id_is_refused(mesh):
    sealer, _ = _seal(mesh, os.urandom(CHUNK))
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, sealer.start, recipient_id="carol")
    assert _reason(err) == "WRONG_RECIPIENT"


def test_the_wrong_recipient_key_cannot_open(mesh):
    sealer, chunks = _seal(mesh, os.urandom(CHUNK))
    opener = _opener(mesh, sealer.start, recipient_key=PayloadKey.generate())
    with pytest.raises(ProtocolError) as err:
        opener.open(*chunks[0])
    assert _reason(err) == "TAMPERED"


def test_a_sender_certificate_from_another_ca_is_refused(mesh):
    sealer, _ = _seal(mesh, os.urandom(CHUNK), sender="foreign")
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, sealer.start)
    assert _reason(err) == "BAD_CERTIFICATE"


def test_oversize_and_inconsistent_headers_are_refused(mesh):
    sealer, _ = _seal(mesh, os.urandom(3 * CHUNK))
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, sealer.start, max_total_size=3 * CHUNK - 1)
    assert _reason(err) == "OVERSIZE"
    _opener(mesh, sealer.start, max_total_size=3 * CHUNK)
    for change in ({"chunk_count": 2}, {"chunk_size": 0}, {"chunk_size": (16 << 20) + 1},
                   {"first_chunk": 3}, {"message_id": b"short"}):
        header = peer_pb2.EnvelopeHeader.FromString(sealer.start.header)
        for field, value in change.items():
            setattr(header, field, value)
        data = header.SerializeToString(deterministic=True)
        start = peer_pb2.EnvelopeStart(header=data, signature=mesh["alice"].sign(data),
                                       sender_certificate_der=mesh["alice"].cert_der)
        with pytest.raises(ProtocolError) as err:
            _opener(mesh, start)
        assert _reason(err) == "MALFORMED", change
    garbage = b"\xff\xff\xff"
    start = peer_pb2.EnvelopeStart(header=garbage, signature=mesh["alice"].sign(garbage),
                                   sender_certificate_der=mesh["alice"].cert_der)
    with pytest.raises(ProtocolError) as err:
        _opener(mesh, start)
    assert _reason(err) == "MALFORMED"


def test_a_resumed_envelope_opens_from_its_first_chunk(mesh):
    payload = os.urandom(5 * CHUNK + 3)
    sealer, chunks = _seal(mesh, payload, first_chunk=3)
    assert [i for i, _, _ in chunks] == [3, 4, 5]
    opener = _opener(mesh, sealer.start)
    assert opener.header.first_chunk == 3 and opener.next_index == 3
    with pytest.raises(ProtocolError) as err:
        opener.open(0, chunks[0][1], False)
    assert _reason(err) == "OUT_OF_ORDER"
    out = b"".join(opener.open(*chunk) for chunk in chunks)
    opener.finish()
    assert out == payload[3 * CHUNK:]


def test_the_sealer_refuses_local_misuse(mesh):
    sealer = EnvelopeSealer(sender=mesh["alice"], recipient_id="bob",
                            recipient_public_key=mesh["bob_key"].public_bytes(), kind="state", epoch=0,
                            round=0, total_size=2 * CHUNK, chunk_size=CHUNK)
    with pytest.raises(ValueError, match="out of order"):
        sealer.seal(1, bytes(CHUNK))
    with pytest.raises(ValueError, match="expected"):
        sealer.seal(0, bytes(CHUNK - 1))
    sealer.seal(0, memoryview(bytes(CHUNK)))
    with pytest.raises(ValueError, match="out of order"):
        sealer.seal(0, bytes(CHUNK))  # never the same nonce twice


def test_payload_key_is_created_0600_and_reloaded(tmp_path):
    path = tmp_path / "payload.key"
    key = PayloadKey.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(key.public_bytes()) == 32 and len(path.read_bytes()) == 32
    assert PayloadKey.load_or_create(path).public_bytes() == key.public_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["payload.key"]


def test_concurrent_first_starts_agree_on_one_payload_key(tmp_path):
    path = tmp_path / "payload.key"
    barrier = threading.Barrier(8)

    def create() -> bytes:
        barrier.wait()
        return PayloadKey.load_or_create(path).public_bytes()

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: create(), range(8)))
    assert keys == {PayloadKey.load_or_create(path).public_bytes()}
    assert [p.name for p in tmp_path.iterdir()] == ["payload.key"]


def test_a_corrupt_payload_key_says_to_delete_it(tmp_path):
    path = tmp_path / "payload.key"
    path.write_bytes(b"short")
    with pytest.raises(PkiError) as err:
        PayloadKey.load_or_create(path)
    assert str(path) in str(err.value) and "delete it to make a new one" in str(err.value)


# ---------------------------------------------------------------- Hello


def _body(node_id="alice", **kw):
    fields = dict(node_id=node_id, protocol_version=1, tokenizer_hash="tok", family_hash="fam",
                  payload_public_key=PayloadKey.generate().public_bytes(), address="127.0.0.1:7000",
                  incarnation=2, issued_unix_ms=123, heartbeat_anchor=bytes(32), heartbeat_base=1)
    fields.update(kw)
    return peer_pb2.HelloBody(**fields)


def test_hello_round_trip(mesh):
    body = _body(capabilities=peer_pb2.Capabilities(max_level=3, step_time_s=0.5))
    hello = sign_hello(mesh["alice"], body)
    assert hello.certificate_der == mesh["alice"].cert_der
    assert verify_hello(mesh["trust"], hello) == body
    # survives a relay that re-serializes the outer message
    relayed = peer_pb2.SignedHello.FromString(hello.SerializeToString())
    assert verify_hello(mesh["trust"], relayed) == body


def test_a_tampered_hello_body_is_a_bad_signature(mesh):
    hello = sign_hello(mesh["alice"], _body())
    body = peer_pb2.HelloBody.FromString(hello.body)
    body.address = "6.6.6.6:7000"
    hello.body = body.SerializeToString(deterministic=True)
    with pytest.raises(ProtocolError) as err:
        verify_hello(mesh["trust"], hello)
    assert _reason(err) == "BAD_SIGNATURE"


def test_a_hello_for_another_node_is_a_bad_certificate(mesh):
    body = _body(node_id="carol").SerializeToString(deterministic=True)
    hello = peer_pb2.SignedHello(body=body, signature=mesh["alice"].sign(body),
                                 certificate_der=mesh["alice"].cert_der)
    with pytest.raises(ProtocolError) as err:
        verify_hello(mesh["trust"], hello)
    assert _reason(err) == "BAD_CERTIFICATE"
    with pytest.raises(PkiError, match="node_id"):
        sign_hello(mesh["alice"], _body(node_id="carol"))


def test_hello_from_another_mesh_or_with_bad_fields_is_refused(mesh):
    with pytest.raises(ProtocolError) as err:
        verify_hello(mesh["trust"], sign_hello(mesh["foreign"], _body()))
    assert _reason(err) == "BAD_CERTIFICATE"
    with pytest.raises(ProtocolError) as err:
        verify_hello(mesh["trust"], sign_hello(mesh["alice"], _body(payload_public_key=b"x" * 31)))
    assert _reason(err) == "MALFORMED"
    for anchor in (b"", b"x" * 31):  # a protocol-1 hello has no heartbeat chain
        with pytest.raises(ProtocolError, match="heartbeat anchor") as err:
            verify_hello(mesh["trust"], sign_hello(mesh["alice"], _body(heartbeat_anchor=anchor)))
        assert _reason(err) == "MALFORMED"
    with pytest.raises(ProtocolError, match="heartbeat_base") as err:
        verify_hello(mesh["trust"], sign_hello(mesh["alice"], _body(heartbeat_base=2**63)))
    assert _reason(err) == "MALFORMED"
    garbage = b"\xff\xff"
    with pytest.raises(ProtocolError) as err:
        verify_hello(mesh["trust"], peer_pb2.SignedHello(body=garbage, signature=mesh["alice"].sign(garbage),
                                                         certificate_der=mesh["alice"].cert_der))
    assert _reason(err) == "MALFORMED"


@pytest.mark.parametrize("change,reason", [({"protocol_version": 2}, "PROTOCOL_MISMATCH"),
                                           ({"tokenizer_hash": "tok2"}, "TOKENIZER_MISMATCH"),
                                           ({"family_hash": "fam2"}, "FAMILY_MISMATCH")])
def test_check_compatible_names_both_values(change, reason):
    local = _body()
    check_compatible(local, _body(node_id="bob"))
    remote = _body(node_id="bob", **change)
    with pytest.raises(ProtocolError) as err:
        check_compatible(local, remote)
    assert Reason.Name(err.value.reason) == reason
    (field, value), = change.items()
    assert str(value) in str(err.value) and str(getattr(local, field)) in str(err.value)
