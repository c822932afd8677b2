"""What fednode reads off an X.509 certificate: the node name (subject CN) and the rule for one,
whether it is a CA, whether its key is ECDSA P-256 and matches a private key, when it expires,
and which errors parsing hostile DER can raise.

The mesh PKI is one CA per mesh and one ECDSA P-256 certificate per node (identity = subject CN);
`ca` issues them, `identity` loads this node's, `trust` checks peers' against the CA.
"""

from __future__ import annotations

import datetime as dt
import re

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fednode.errors import PkiError

# What cryptography raises while parsing or reading hostile DER: ValueError mostly, but one flipped
# byte of a peer's certificate or CRL can also give InvalidVersion, UnsupportedAlgorithm (signature
# OID), KeyError or TypeError (fields read lazily), none of them a ValueError.
CERT_PARSE_ERRORS = (ValueError, TypeError, KeyError, x509.InvalidVersion, x509.DuplicateExtension,
                     x509.UnsupportedGeneralNameType, UnsupportedAlgorithm)

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SIGNATURE = ec.ECDSA(hashes.SHA256())  # what a node key signs with (Hellos, envelope headers, records)


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise PkiError(f"invalid node name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    if name.lower() == "ca":
        raise PkiError("node name 'ca' is reserved (it would overwrite the CA files): pick another name")
    return name


def common_name(cert: x509.Certificate) -> str | None:
    """The subject CN (the node id for node certificates), or None."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1)


def same_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    """Whether `cert` is for `key` (same public key)."""
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def certificate_expiry(cert_pem_or_der: bytes | str) -> dt.datetime:
    """When a certificate (PEM or DER) stops being valid, as an aware UTC datetime."""
    data = cert_pem_or_der.encode() if isinstance(cert_pem_or_der, str) else bytes(cert_pem_or_der)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except CERT_PARSE_ERRORS:
        raise PkiError("not a PEM or DER X.509 certificate: pass the contents of a .crt file") from None
    return cert.not_valid_after_utc
