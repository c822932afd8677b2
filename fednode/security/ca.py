"""The mesh CA's tooling (`fednode ca init`, `fednode ca issue`): make the CA, load it back, and
issue each node its ECDSA P-256 key and certificate (subject CN = node name, SANs = the addresses
peers dial). Keys are written 0600, certificates 0644.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fednode.errors import PkiError
from fednode.security.certificates import CERT_PARSE_ERRORS, same_key, validate_node_name
from fednode.security.pem_files import read_file, write_private_key, write_public_pem

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock differences between sites


@dataclass(frozen=True)
class CaFiles:
    key_path: Path
    cert_path: Path


@dataclass(frozen=True)
class NodeFiles:
    key_path: Path
    cert_path: Path
    ca_path: Path


def init_ca(directory: Path, *, name: str = "fednode mesh CA", days: int = 3650,
            force: bool = False) -> CaFiles:
    """Create the mesh CA (ca.key 0600 + ca.crt); refuses to replace an existing CA key."""
    directory = Path(directory)
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if key_path.exists() and not force:
        raise PkiError(f"a mesh CA already exists in {directory} ({key_path}): use it, or pass --force "
                       "to replace it (every node must then be re-issued)")
    if days < 1:
        raise PkiError(f"CA validity must be at least 1 day, got {days}: pass a positive --days")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_key(key_path, key)
    write_public_pem(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return CaFiles(key_path=key_path, cert_path=cert_path)


def load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA key and certificate in `directory`, checked to be a pair (issuing, revoking)."""
    fix = f"create one with `fednode ca init --dir {directory}`"
    key_pem = read_file(directory / CA_KEY, "mesh CA key", fix)
    cert_pem = read_file(directory / CA_CERT, "mesh CA certificate", fix)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"mesh CA key {directory / CA_KEY} is not an unencrypted PEM key: "
                       f"restore it from backup or {fix} --force") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except CERT_PARSE_ERRORS:
        raise PkiError(f"mesh CA certificate {directory / CA_CERT} is not a PEM certificate: "
                       f"restore it from backup or {fix} --force") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not same_key(key, cert):
        raise PkiError(f"mesh CA key {directory / CA_KEY} does not match {directory / CA_CERT}: "
                       f"restore the pair from backup or {fix} --force")
    return key, cert


def _host_of(address: str) -> str:
    """Accept host, host:port, IPv6 and [IPv6]:port; the port is not part of the certificate."""
    address = address.strip()
    if address.startswith("["):
        host, sep, _ = address[1:].partition("]")
        return host if sep else address
    if address.count(":") == 1:
        host, port = address.split(":")
        if port.isdigit():
            return host
    return address


def _san(address: str) -> x509.GeneralName:
    host = _host_of(address)
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise PkiError(f"address {address!r} is neither an IP address nor a host name: pass e.g. "
                       "--addr 10.0.0.5,node1.example.org")
    return x509.DNSName(host.rstrip(".").lower())


def _subject_alt_names(name: str, addresses: list[str]) -> list[x509.GeneralName]:
    if isinstance(addresses, str) or not addresses:
        raise PkiError(f"node {name} needs at least one address for its certificate: pass --addr "
                       "with every IP/host name peers use to reach it, comma-separated")
    sans: list[x509.GeneralName] = []
    for general_name in [*(_san(a) for a in addresses), x509.DNSName(name.lower())]:
        if general_name not in sans:
            sans.append(general_name)
    return sans


def issue_node(directory: Path, name: str, addresses: list[str], *, days: int = 365) -> NodeFiles:
    """Issue (or re-issue, for rotation) the key and certificate of node `name` from the CA."""
    if days < 1:
        raise PkiError(f"certificate validity must be at least 1 day, got {days}: pass a positive --days")
    now = dt.datetime.now(dt.UTC)
    return _issue_node(Path(directory), name, addresses, not_before=now - BACKDATE,
                       not_after=now + dt.timedelta(days=days))


def _issue_node(directory: Path, name: str, addresses: list[str], *, not_before: dt.datetime,
                not_after: dt.datetime) -> NodeFiles:
    """The unchecked-validity worker behind issue_node (tests use it to make expired certs)."""
    validate_node_name(name)
    sans = _subject_alt_names(name, addresses)
    ca_key, ca_cert = load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = NodeFiles(key_path=directory / f"{name}.key", cert_path=directory / f"{name}.crt",
                      ca_path=directory / CA_CERT)
    write_private_key(files.key_path, key)
    write_public_pem(files.cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return files

