"""The trust store: checks peer certificates and signatures against the mesh CA (chain, validity,
node name, P-256 key; cached per certificate) and the mesh's newest CA-signed revocation list.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from collections import OrderedDict
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from fednode.errors import PkiError, ProtocolError, Reason
from fednode.security.certificates import CERT_PARSE_ERRORS, NODE_NAME, SIGNATURE, common_name, is_ca, is_p256
from fednode.security.revocation import RevocationList, RevokedCertificate, serial_hex, verify_revocation_list


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
        if not is_ca(ca):
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
            entry.public_key.verify(bytes(signature), bytes(data), SIGNATURE)
        except InvalidSignature:
            raise ProtocolError(Reason.BAD_SIGNATURE,
                                f"signature does not verify with the certificate of {entry.node_id}: "
                                "the data was altered or signed by another key") from None
        return entry.node_id

    def _check(self, cert_der: bytes, now: dt.datetime | None) -> _Verified:
        entry = self._verified(bytes(cert_der))
        revocation = self.revocation
        if revocation is not None and revocation.revokes(entry.serial):
            raise RevokedCertificate(f"certificate of {entry.node_id} (serial {serial_hex(entry.serial)}) is revoked "
                                     f"by the mesh CA (revocation list #{revocation.number}): that node needs a new "
                                     "certificate from `fednode ca issue`", revocation.der)
        now = now or dt.datetime.now(dt.UTC)
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
        if is_ca(cert):
            raise refuse(f"certificate of {name!r} is a CA certificate: peers must present a node "
                         "certificate")
        if not name or not NODE_NAME.fullmatch(name):
            raise refuse(f"certificate common name {name!r} is not a valid node name: re-issue it "
                         "with `fednode ca issue`")
        public_key = cert.public_key()
        if not is_p256(public_key):
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
