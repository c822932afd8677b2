"""Mesh PKI: one CA per mesh, one ECDSA P-256 certificate per node (identity = subject CN).

The CA signs node certificates; every peer check (TLS, signed Hellos, envelope headers) comes
down to "was this certificate issued by our CA, is it current, what is its CN". Files are
written atomically so a crash or a concurrent reader never sees half a key.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fednode.errors import PkiError, ProtocolError, Reason

# What cryptography raises while parsing or reading hostile DER: ValueError mostly, but one flipped
# byte of a peer's certificate or CRL can also give InvalidVersion, UnsupportedAlgorithm (signature
# OID), KeyError or TypeError (fields read lazily), none of them a ValueError.
CERT_PARSE_ERRORS = (ValueError, TypeError, KeyError, x509.InvalidVersion, x509.DuplicateExtension,
                     x509.UnsupportedGeneralNameType, UnsupportedAlgorithm)

if TYPE_CHECKING:
    from fednode.security.revocation import RevocationList

log = logging.getLogger(__name__)

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")
BACKDATE = dt.timedelta(minutes=5)  # tolerate small clock differences between sites
EXPIRY_WARN_DAYS = 30  # warn (daemon start, reload, twice a day; fednode check) when a cert expires sooner
_SIG = ec.ECDSA(hashes.SHA256())


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """tmp + fsync + rename: readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: Path, what: str, fix: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist: {fix}") from None
    except IsADirectoryError:
        raise PkiError(f"{what} {path} is a directory, not a file: {fix}") from None
    except PermissionError:
        raise PkiError(
            f"cannot read {what} {path} (permission denied): run fednode as the user that owns it"
        ) from None
    except OSError as e:
        raise PkiError(f"cannot read {what} {path} ({e.strerror}): {fix}") from None


def _warn_if_exposed(path: Path) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("key file %s is readable by group/others (mode %03o): run `chmod 600 %s`",
                    path, mode & 0o777, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def common_name(cert: x509.Certificate) -> str | None:
    """The subject CN (the node id for node certificates), or None."""
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1)


# --------------------------------------------------------------------------- CA


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
    now = _now()
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
    _atomic_write(key_path, _pem_key(key), 0o600)
    _atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CaFiles(key_path=key_path, cert_path=cert_path)


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    fix = f"create one with `fednode ca init --dir {directory}`"
    key_pem = _read(directory / CA_KEY, "mesh CA key", fix)
    cert_pem = _read(directory / CA_CERT, "mesh CA certificate", fix)
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
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not _same_key(key, cert):
        raise PkiError(f"mesh CA key {directory / CA_KEY} does not match {directory / CA_CERT}: "
                       f"restore the pair from backup or {fix} --force")
    return key, cert


def _same_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


# --------------------------------------------------------------------------- nodes


def validate_node_name(name: str) -> str:
    if not isinstance(name, str) or not NODE_NAME.fullmatch(name):
        raise PkiError(f"invalid node name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
                       "starting with a letter or digit")
    if name.lower() == "ca":
        raise PkiError("node name 'ca' is reserved (it would overwrite the CA files): pick another name")
    return name


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
    now = _now()
    return _issue_node(Path(directory), name, addresses, not_before=now - BACKDATE,
                       not_after=now + dt.timedelta(days=days))


def _issue_node(directory: Path, name: str, addresses: list[str], *, not_before: dt.datetime,
                not_after: dt.datetime) -> NodeFiles:
    """The unchecked-validity worker behind issue_node (tests use it to make expired certs)."""
    validate_node_name(name)
    sans = _subject_alt_names(name, addresses)
    ca_key, ca_cert = _load_ca(directory)
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
    _atomic_write(files.key_path, _pem_key(key), 0o600)
    _atomic_write(files.cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return files


# --------------------------------------------------------------------------- identity


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
        return self._private_key.sign(data, _SIG)


def load_identity(cert_path: Path, key_path: Path, ca_path: Path) -> NodeIdentity:
    """Load and cross-check the node's certificate, key and mesh CA; every failure says the fix."""
    cert_path, key_path, ca_path = Path(cert_path), Path(key_path), Path(ca_path)
    ca_dir, name = ca_path.parent, cert_path.stem
    reissue = f"re-issue it with `fednode ca issue --dir {ca_dir} {name} --addr ADDRESS`"
    cert_pem = _read(cert_path, "node certificate", reissue)
    key_pem = _read(key_path, "node key", reissue)
    ca_pem = _read(ca_path, "mesh CA certificate",
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
    if not _is_p256(key):
        raise PkiError(f"node key {key_path} is not an ECDSA P-256 key: {reissue}")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    if not _same_key(key, cert):
        raise PkiError(f"node key {key_path} does not belong to certificate {cert_path}: use the .key "
                       f"written together with that certificate, or {reissue}")
    if not _is_ca(ca):
        raise PkiError(f"{ca_path} is not a CA certificate: pass the mesh CA's ca.crt as the CA file")
    if _is_ca(cert):
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
    now = _now()
    if now > ca.not_valid_after_utc:
        raise PkiError(f"mesh CA certificate {ca_path} expired at {ca.not_valid_after_utc:%Y-%m-%d %H:%M}"
                       " UTC: make a new CA with `fednode ca init --force` and re-issue every node")
    if now > cert.not_valid_after_utc:
        raise PkiError(f"certificate {cert_path} expired at {cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
                       f"UTC: {reissue}")
    if now < cert.not_valid_before_utc:
        raise PkiError(f"certificate {cert_path} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC: check this machine's clock")
    _warn_if_exposed(key_path)
    return NodeIdentity(
        node_id=node_id, cert_pem=cert_pem, cert_der=cert.public_bytes(serialization.Encoding.DER),
        key_pem=key_pem, ca_pem=ca_pem, not_after=cert.not_valid_after_utc,
        _private_key=key, _certificate=cert,
    )


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


# --------------------------------------------------------------------------- peer checks


class _Verified(NamedTuple):
    node_id: str
    public_key: ec.EllipticCurvePublicKey
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int


def _load_cas(ca_pem: bytes) -> list[x509.Certificate]:
    try:
        cas = x509.load_pem_x509_certificates(bytes(ca_pem))
    except CERT_PARSE_ERRORS:
        raise PkiError("mesh CA PEM holds no certificate: pass the contents of ca.crt") from None
    for ca in cas:
        if not _is_ca(ca):
            raise PkiError(f"certificate {common_name(ca)!r} in the CA bundle is not a CA: pass the mesh "
                           "CA's ca.crt")
    return cas


class TrustStore:
    """Checks peer certificates and signatures against the mesh CA (PEM may hold several CAs,
    e.g. old + new during a CA rotation) and its revocation list. Chain checks are cached by DER
    hash: this runs per message; the revocation check is a set lookup after the cache."""

    def __init__(self, ca_pem: bytes, *, cache_size: int = 1024):
        self.ca_pem = bytes(ca_pem)
        self._cas = _load_cas(ca_pem)
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.revocation: RevocationList | None = None  # the newest verified CRL of the mesh CA
        self._refused_lists: OrderedDict[bytes, None] = OrderedDict()  # hashes of CRLs already refused

    @property
    def cas(self) -> list[x509.Certificate]:
        return list(self._cas)

    def set_ca_pem(self, ca_pem: bytes) -> bool:
        """Trust another CA bundle from now on (config reload). Cached chain checks are dropped; the
        revocation list in force is kept only if one of the new CAs signed it. True if it was kept
        (or there was none)."""
        from fednode.security.revocation import verify_revocation_list

        cas = _load_cas(ca_pem)
        with self._lock:
            self.ca_pem, self._cas = bytes(ca_pem), cas
            self._cache.clear()
            self._refused_lists.clear()
            if self.revocation is None:
                return True
            try:
                verify_revocation_list(self.revocation.der, cas)
            except ProtocolError:
                self.revocation = None
                return False
            return True

    def consider_revocation_list(self, data: bytes) -> RevocationList | None:
        """Adopt `data` (a CRL, PEM or DER) if a mesh CA signed it and it is newer than the list in
        force; returns the adopted list, or None when it is the same, older, or was refused before.
        Raises ProtocolError (BAD_SIGNATURE, MALFORMED) the first time a given bad list is seen."""
        from fednode.security.revocation import verify_revocation_list

        data = bytes(data)
        current = self.revocation
        if not data or (current is not None and data == current.der):
            return None
        digest = hashlib.sha256(data).digest()
        with self._lock:
            if digest in self._refused_lists:
                return None
        try:
            candidate = verify_revocation_list(data, self._cas)
        except ProtocolError:
            with self._lock:
                self._refused_lists[digest] = None
                while len(self._refused_lists) > 64:
                    self._refused_lists.popitem(last=False)
            raise
        with self._lock:
            if not candidate.is_newer_than(self.revocation):
                return None
            self.revocation = candidate
        return candidate

    def serial_of(self, cert_der: bytes) -> int | None:
        """The serial of a DER certificate (None if it does not parse)."""
        try:
            return x509.load_der_x509_certificate(bytes(cert_der)).serial_number
        except CERT_PARSE_ERRORS:
            return None

    def is_revoked(self, cert_der: bytes) -> bool:
        revocation = self.revocation
        if revocation is None:
            return False
        serial = self.serial_of(cert_der)
        return serial is not None and revocation.revokes(serial)

    def verify_certificate(self, cert_der: bytes, *, now: dt.datetime | None = None) -> str:
        """The node id (CN) of a current, non-CA certificate issued by the mesh CA."""
        return self._check(cert_der, now).node_id

    def verify_signature(self, cert_der: bytes, data: bytes, signature: bytes, *,
                         now: dt.datetime | None = None) -> str:
        """Check the certificate, then its key's ECDSA-SHA256 signature over `data`; the node id."""
        entry = self._check(cert_der, now)
        try:
            entry.public_key.verify(bytes(signature), bytes(data), _SIG)
        except InvalidSignature:
            raise ProtocolError(Reason.BAD_SIGNATURE,
                                f"signature does not verify with the certificate of {entry.node_id}: "
                                "the data was altered or signed by another key") from None
        return entry.node_id

    def _check(self, cert_der: bytes, now: dt.datetime | None) -> _Verified:
        entry = self._verified(bytes(cert_der))
        revocation = self.revocation
        if revocation is not None and revocation.revokes(entry.serial):
            from fednode.security.revocation import RevokedCertificate, serial_hex

            raise RevokedCertificate(f"certificate of {entry.node_id} (serial {serial_hex(entry.serial)}) is revoked "
                                     f"by the mesh CA (revocation list #{revocation.number}): that node needs a new "
                                     "certificate from `fednode ca issue`", revocation.der)
        now = now or _now()
        if now > entry.not_after:
            raise ProtocolError(Reason.BAD_CERTIFICATE,
                                f"certificate of {entry.node_id} expired at {entry.not_after:%Y-%m-%d %H:%M}"
                                " UTC: that node must be re-issued with `fednode ca issue`")
        if now < entry.not_before:
            raise ProtocolError(Reason.BAD_CERTIFICATE,
                                f"certificate of {entry.node_id} is not valid before "
                                f"{entry.not_before:%Y-%m-%d %H:%M} UTC: check the clocks of both nodes")
        return entry

    def _verified(self, der: bytes) -> _Verified:
        digest = hashlib.sha256(der).digest()
        with self._lock:
            entry = self._cache.get(digest)
            if entry is not None:
                self._cache.move_to_end(digest)
                return entry
        entry = self._verify_chain(der)
        with self._lock:
            self._cache[digest] = entry
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return entry

    def _verify_chain(self, der: bytes) -> _Verified:
        def refuse(detail: str) -> ProtocolError:
            return ProtocolError(Reason.BAD_CERTIFICATE, detail)

        try:
            cert = x509.load_der_x509_certificate(der)
            name = common_name(cert)
            issued = self._issued_by_a_ca(cert)
        except CERT_PARSE_ERRORS:
            raise refuse("peer certificate is not a DER X.509 certificate: send the node "
                         "certificate from `fednode ca issue`") from None
        if not issued:
            raise refuse(f"certificate of {name!r} was not issued by this mesh's CA: the peer needs "
                         "a certificate from this mesh's `fednode ca issue`")
        if _is_ca(cert):
            raise refuse(f"certificate of {name!r} is a CA certificate: peers must present a node "
                         "certificate")
        if not name or not NODE_NAME.fullmatch(name):
            raise refuse(f"certificate common name {name!r} is not a valid node name: re-issue it "
                         "with `fednode ca issue`")
        public_key = cert.public_key()
        if not _is_p256(public_key):
            raise refuse(f"certificate of {name} has no ECDSA P-256 key: re-issue it with "
                         "`fednode ca issue`")
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        return _Verified(name, public_key, cert.not_valid_before_utc, cert.not_valid_after_utc, cert.serial_number)

    def _issued_by_a_ca(self, cert: x509.Certificate) -> bool:
        for ca in self._cas:
            try:
                cert.verify_directly_issued_by(ca)
                return True
            except (ValueError, TypeError, InvalidSignature):
                continue
        return False
