"""Certificate revocation: an X.509 CRL signed by the mesh CA, spread by gossip.

The CA side (`revoke_certificate`, behind `fednode ca revoke`) keeps `revoked.crl` (PEM) next to
`ca.key`: every revocation adds a certificate serial and bumps the CRL number. The node side
(`verify_revocation_list`) accepts a list only when a trusted mesh CA signed it; between two valid
lists the higher CRL number (then the later `last_update`) wins, so every node converges on the
newest one whatever order gossip delivers them in. `next_update` is written (X.509 wants it) but
not enforced: a fednode revocation list never lapses, a newer one only adds to it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fednode.errors import PkiError, ProtocolError, Reason
from fednode.security.ca import load_ca
from fednode.security.certificates import CERT_PARSE_ERRORS, validate_node_name
from fednode.security.pem_files import read_file, write_public_pem

CRL_FILE = "revoked.crl"
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified,
    "key-compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded,
    "cessation-of-operation": x509.ReasonFlags.cessation_of_operation,
}


class RevokedCertificate(ProtocolError):
    """A certificate on the mesh's revocation list. Carries the list (DER) so a refused peer can
    learn, verifiably, that it was revoked."""

    def __init__(self, detail: str, revocation_list: bytes):
        super().__init__(Reason.BAD_CERTIFICATE, detail, revocation_list=revocation_list)


@dataclass(frozen=True)
class RevocationList:
    """A verified CRL of the mesh CA."""

    der: bytes
    number: int
    last_update: dt.datetime
    serials: frozenset[int]
    issuer: str

    @property
    def version(self) -> tuple[int, dt.datetime]:
        return (self.number, self.last_update)

    def is_newer_than(self, other: RevocationList | None) -> bool:
        return other is None or self.version > other.version

    def revokes(self, serial: int) -> bool:
        return serial in self.serials

    def pem(self) -> bytes:
        return x509.load_der_x509_crl(self.der).public_bytes(serialization.Encoding.PEM)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest()


def serial_hex(serial: int) -> str:
    return f"{serial:x}"


def _parse(data: bytes) -> x509.CertificateRevocationList:
    data = bytes(data)
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_crl(data)
    return x509.load_der_x509_crl(data)


def verify_revocation_list(data: bytes, cas: list[x509.Certificate]) -> RevocationList:
    """Parse a CRL (PEM or DER) and check it was signed by one of `cas`; refuses with a typed reason."""
    try:
        return _verify(_parse(data), cas)
    except CERT_PARSE_ERRORS:
        raise ProtocolError(Reason.MALFORMED, "revocation list is not an X.509 CRL: it must come from "
                                              "`fednode ca revoke`") from None


def _verify(crl: x509.CertificateRevocationList, cas: list[x509.Certificate]) -> RevocationList:
    for ca in cas:
        if crl.issuer != ca.subject:
            continue
        public_key = ca.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            continue
        try:
            valid = crl.is_signature_valid(public_key)
        except (ValueError, TypeError):
            valid = False
        if valid:
            break
    else:
        raise ProtocolError(Reason.BAD_SIGNATURE, "revocation list is not signed by this mesh's CA: only "
                                                  "`fednode ca revoke` with the mesh CA key makes valid ones")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise ProtocolError(Reason.MALFORMED, "revocation list has no CRL number: it must come from "
                                              "`fednode ca revoke`") from None
    return RevocationList(der=crl.public_bytes(serialization.Encoding.DER), number=int(number),
                          last_update=crl.last_update_utc, serials=frozenset(r.serial_number for r in crl),
                          issuer=crl.issuer.rfc4514_string())


def load_revocation_list(path: Path, cas: list[x509.Certificate], *, what: str = "revocation list") -> RevocationList:
    """Read and verify a CRL file; every failure is a one-line PkiError naming the file and the fix."""
    fix = "copy revoked.crl from the mesh CA directory again (`fednode ca revoke` writes it)"
    data = read_file(Path(path), what, fix)
    try:
        return verify_revocation_list(data, cas)
    except ProtocolError as exc:
        raise PkiError(f"{what} {path} is refused ({exc.detail.split(':')[0]}): {fix}") from None


def certificate_serial(cert_pem_or_der: bytes) -> int:
    data = bytes(cert_pem_or_der)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data).serial_number
        return x509.load_der_x509_certificate(data).serial_number
    except CERT_PARSE_ERRORS:
        raise PkiError("not a PEM or DER X.509 certificate: pass the node's .crt file") from None


# --------------------------------------------------------------------------- CA side


@dataclass(frozen=True)
class Revoked:
    """What `revoke_certificate` did."""

    path: Path
    name: str | None
    serial: int
    number: int
    count: int
    already: bool  # the serial was on the list before: nothing changed


def revoke_certificate(directory: Path, name: str | None = None, *, serial: int | None = None,
                       reason: str = "unspecified", now: dt.datetime | None = None) -> Revoked:
    """Add a certificate to the CA's revocation list `directory/revoked.crl` (created if needed).

    The certificate is `directory/NAME.crt` unless `serial` names another one (e.g. an older
    certificate of a node that was re-issued since)."""
    directory = Path(directory)
    if reason not in REASONS:
        raise PkiError(f"unknown revocation reason {reason!r}: use one of {', '.join(REASONS)}")
    ca_key, ca_cert = load_ca(directory)
    if serial is None:
        if name is None:
            raise PkiError("say which certificate to revoke: pass a node NAME or --serial HEX")
        validate_node_name(name)
        cert_path = directory / f"{name}.crt"
        cert_pem = read_file(cert_path, "node certificate",
                             f"pass --serial HEX to revoke a certificate that is no longer in {directory}")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise PkiError(f"node certificate {cert_path} is not a PEM certificate: pass --serial HEX "
                           "instead") from None
        if cert.issuer != ca_cert.subject:
            raise PkiError(f"certificate {cert_path} was not issued by the CA in {directory}: nothing to revoke "
                           "there (its own CA's revocation list would)")
        serial = cert.serial_number
    if serial <= 0:
        raise PkiError(f"certificate serial {serial} is not positive: pass the serial in hex, as "
                       "`openssl x509 -noout -serial` prints it")
    path = directory / CRL_FILE
    entries: list[x509.RevokedCertificate] = []
    number = 0
    if path.exists():
        try:
            current = verify_revocation_list(path.read_bytes(), [ca_cert])
        except ProtocolError as exc:
            raise PkiError(f"revocation list {path} is refused ({exc.detail.split(':')[0]}): if the CA was "
                           f"replaced (`ca init --force`), delete the old list; else restore it from backup") from None
        except OSError as exc:
            raise PkiError(f"cannot read revocation list {path} ({exc.strerror}): check its permissions") from None
        number = current.number
        entries = list(x509.load_der_x509_crl(current.der))
        if current.revokes(serial):
            return Revoked(path, name, serial, number, len(entries), already=True)
    now = now or dt.datetime.now(dt.UTC)
    entries.append(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
                   .add_extension(x509.CRLReason(REASONS[reason]), critical=False).build())
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now)
               .next_update(max(ca_cert.not_valid_after_utc, now + dt.timedelta(days=1)))
               .add_extension(x509.CRLNumber(number + 1), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False))
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    write_public_pem(path, crl.public_bytes(serialization.Encoding.PEM))
    return Revoked(path, name, serial, number + 1, len(entries), already=False)
