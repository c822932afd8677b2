"""Signed Hello: a node's identity, compatibility hashes and payload key, signed by its certificate key.

Hellos travel through gossip, so a relaying node could alter them; the signature over the exact
body bytes and the body.node_id == certificate CN rule make a Hello speak only for its owner.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from fednode.errors import PkiError, ProtocolError, Reason
from fednode.security import bounds
from fednode.security.heartbeat import PROOF_BYTES
from fednode.security.identity import NodeIdentity
from fednode.security.trust import TrustStore
from fednode.v1 import peer_pb2

PAYLOAD_KEY_BYTES = 32


def sign_hello(identity: NodeIdentity, body: peer_pb2.HelloBody) -> peer_pb2.SignedHello:
    """Serialize `body` once (deterministically) and sign those exact bytes."""
    if body.node_id != identity.node_id:
        raise PkiError(f"Hello body node_id {body.node_id!r} differs from this node's certificate CN "
                       f"{identity.node_id!r}: build the HelloBody with node_id=identity.node_id")
    data = body.SerializeToString(deterministic=True)
    return peer_pb2.SignedHello(body=data, signature=identity.sign(data),
                                certificate_der=identity.cert_der)


def verify_hello(trust: TrustStore, hello: peer_pb2.SignedHello) -> peer_pb2.HelloBody:
    """Check certificate and signature, then parse; the body is returned only if it is the signer's."""
    signer = trust.verify_signature(hello.certificate_der, hello.body, hello.signature)
    body = peer_pb2.HelloBody()
    try:
        body.ParseFromString(hello.body)
    except DecodeError:
        raise ProtocolError(Reason.MALFORMED,
                            f"Hello body from {signer} does not parse as HelloBody: the peer must send "
                            "a serialized fednode.v1.HelloBody") from None
    if body.node_id != signer:
        raise ProtocolError(Reason.BAD_CERTIFICATE,
                            f"Hello claims node {body.node_id!r} but is signed by {signer!r}: a node may "
                            "only announce itself, under its own certificate")
    bounds.check_int("hello incarnation", body.incarnation, bounds.MAX_INCARNATION, who=signer)
    bounds.check_int("hello max_level", body.capabilities.max_level, bounds.MAX_LEVEL, who=signer)
    bounds.check_int("hello heartbeat_base", body.heartbeat_base, bounds.MAX_HEARTBEAT, who=signer)
    if len(body.heartbeat_anchor) != PROOF_BYTES:
        raise ProtocolError(Reason.MALFORMED,
                            f"Hello from {signer} has a {len(body.heartbeat_anchor)}-byte heartbeat anchor: it "
                            f"must be the {PROOF_BYTES}-byte end of its heartbeat chain (fednode >= protocol 2)")
    if len(body.payload_public_key) != PAYLOAD_KEY_BYTES:
        raise ProtocolError(Reason.MALFORMED,
                            f"Hello from {signer} has a {len(body.payload_public_key)}-byte payload key: "
                            f"it must be a raw {PAYLOAD_KEY_BYTES}-byte X25519 public key")
    return body


def check_compatible(local: peer_pb2.HelloBody, remote: peer_pb2.HelloBody) -> None:
    """Refuse peers whose messengers cannot be exchanged with ours (protocol, tokenizer, family)."""
    who = remote.node_id or "peer"
    if local.protocol_version != remote.protocol_version:
        raise ProtocolError(Reason.PROTOCOL_MISMATCH,
                            f"{who} speaks protocol {remote.protocol_version}, {local.node_id} speaks "
                            f"{local.protocol_version}: run the same fednode protocol version on both")
    if local.tokenizer_hash != remote.tokenizer_hash:
        raise ProtocolError(Reason.TOKENIZER_MISMATCH,
                            f"{who} uses tokenizer {remote.tokenizer_hash!r}, {local.node_id} uses "
                            f"{local.tokenizer_hash!r}: configure the same tokenizer on every node")
    if local.family_hash != remote.family_hash:
        raise ProtocolError(Reason.FAMILY_MISMATCH,
                            f"{who} uses messenger family {remote.family_hash!r}, {local.node_id} uses "
                            f"{local.family_hash!r}: configure the same messenger family on every node")
