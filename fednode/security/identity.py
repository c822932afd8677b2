"""This node's identity: its certificate, key and mesh CA loaded from disk and cross-checked
(`load_identity`, every failure a one-line PkiError saying the fix), and signing with its key.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fednode.errors import PkiError
from fednode.security.certificates import (
    CERT_PARSE_ERRORS,
    NODE_NAME,
    SIGNATURE,
    common_name,
    is_ca,
    is_p256,
    same_key,
)
from fednode.security.pem_files import read_file, warn_if_exposed

EXPIRY_WARN_DAYS = 30  # warn (daemon start, reload, twice a day; fednode check) when a cert expires sooner


@dataclass(frozen=True)
class NodeIdentity:
    """This node's loaded, checked credentials (key_pem is kept out of repr so logs never leak it)."""

    node_id: str
    cert_pem: bytes
    cert_der: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes = field(repr=False)
    not_after: dt.datetime
    _private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)
    _certificate: x509.Certificate = field(repr=False, compare=False)

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        return self._private_key

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def sign(self, data: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature (DER) by the certificate key."""
        return self._private_key.sign(data, SIGNATURE)


def load_identity(cert_path: Path, key_path: Path, ca_path: Path) -> NodeIdentity:
    """Load and cross-check the node's certificate, key and mesh CA; every failure says the fix."""
    cert_path, key_path, ca_path = Path(cert_path), Path(key_path), Path(ca_path)
    ca_dir, name = ca_path.parent, cert_path.stem
    reissue = f"re-issue it with `fednode ca issue --dir {ca_dir} {name} --addr ADDRESS`"
    cert_pem = read_file(cert_path, "node certificate", reissue)
    key_pem = read_file(key_path, "node key", reissue)
    ca_pem = read_file(ca_path, "mesh CA certificate",
                   f"copy ca.crt from the mesh CA directory (`fednode ca init --dir {ca_dir}` makes one)")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except CERT_PARSE_ERRORS:
        raise PkiError(f"node certificate {cert_path} is not a PEM certificate: {reissue}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"node key {key_path} is not an unencrypted PEM private key: {reissue}") from None
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except CERT_PARSE_ERRORS:
        raise PkiError(f"mesh CA certificate {ca_path} is not a PEM certificate: copy ca.crt "
                       "from the mesh CA directory again") from None
    if not is_p256(key):
        raise PkiError(f"node key {key_path} is not an ECDSA P-256 key: {reissue}")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    if not same_key(key, cert):
        raise PkiError(f"node key {key_path} does not belong to certificate {cert_path}: use the .key "
                       f"written together with that certificate, or {reissue}")
    if not is_ca(ca):
        raise PkiError(f"{ca_path} is not a CA certificate: pass the mesh CA's ca.crt as the CA file")
    if is_ca(cert):
        raise PkiError(f"{cert_path} is a CA certificate, not a node certificate: pass the node's "
                       f"<name>.crt, or {reissue}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(f"certificate {cert_path} was not issued by the mesh CA {ca_path}: {reissue}") \
            from None
    node_id = common_name(cert)
    if not node_id or not NODE_NAME.fullmatch(node_id):
        raise PkiError(f"certificate {cert_path} has no valid node name as its common name: {reissue}")
    now = dt.datetime.now(dt.UTC)
    if now > ca.not_valid_after_utc:
        raise PkiError(f"mesh CA certificate {ca_path} expired at {ca.not_valid_after_utc:%Y-%m-%d %H:%M}"
                       " UTC: make a new CA with `fednode ca init --force` and re-issue every node")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"certificate {cert_path} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
                       f"UTC: {reissue}")
    if now < cert.not_valid_before_utc:
        raise PkiError(f"certificate {cert_path} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this machine's clock")
    warn_if_exposed(key_path)
    return NodeIdentity(
        node_id=node_id, cert_pem=cert_pem, cert_der=cert.public_bytes(serialization.Encoding.DER),
        key_pem=key_pem, ca_pem=ca_pem, not_after=cert.not_valid_after_utc,
        _private_key=key, _certificate=cert,
    )
