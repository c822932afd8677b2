"""Mesh PKI: CA and node files, identity loading with actionable errors, peer certificate checks."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers_pki import make_ca, make_identity, make_mesh

from fednode.errors import PkiError, ProtocolError, Reason
from fednode.security.ca import _issue_node, init_ca, issue_node
from fednode.security.certificates import certificate_expiry, common_name
from fednode.security.identity import load_identity
from fednode.security.trust import TrustStore


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_init_ca_writes_private_key_0600_and_a_ca_certificate(tmp_path):
    files = init_ca(tmp_path / "ca", name="acme mesh")
    assert files.key_path == tmp_path / "ca" / "ca.key"
    assert _mode(files.key_path) == 0o600
    assert _mode(files.cert_path) == 0o644
    cert = _cert(files.cert_path)
    assert common_name(cert) == "acme mesh"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    assert not [p for p in tmp_path.joinpath("ca").iterdir() if p.name.endswith(".tmp")]


def test_init_ca_refuses_to_replace_an_existing_ca_unless_forced(tmp_path):
    first = init_ca(tmp_path)
    before = first.key_path.read_bytes()
    with pytest.raises(PkiError, match=r"already exists.*--force"):
        init_ca(tmp_path)
    assert first.key_path.read_bytes() == before
    init_ca(tmp_path, force=True)
    assert first.key_path.read_bytes() != before
    assert _mode(first.key_path) == 0o600


def test_issue_node_puts_ips_and_hostnames_in_the_right_san_types(tmp_path):
    make_ca(tmp_path)
    files = issue_node(tmp_path, "n1", ["10.0.0.5", "Node1.Example.org", "[::1]:7000", "localhost:9000"])
    assert files.key_path.name == "n1.key" and files.ca_path == tmp_path / "ca.crt"
    assert _mode(files.key_path) == 0o600
    assert _mode(files.cert_path) == 0o644
    cert = _cert(files.cert_path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5"),
                                                       ipaddress.ip_address("::1")]
    assert san.get_values_for_type(x509.DNSName) == ["node1.example.org", "localhost", "n1"]
    assert common_name(cert) == "n1"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature


@pytest.mark.parametrize("name", ["", "-n1", "a/b", "../x", "x" * 64, "ca", "CA", "n 1"])
def test_issue_node_rejects_bad_names(tmp_path, name):
    make_ca(tmp_path)
    with pytest.raises(PkiError, match="node name"):
        issue_node(tmp_path, name, ["127.0.0.1"])
    assert (tmp_path / "ca.key").exists()


@pytest.mark.parametrize("addresses", [[], ["not a host!"], ["under_score.example"]])
def test_issue_node_rejects_bad_addresses(tmp_path, addresses):
    make_ca(tmp_path)
    with pytest.raises(PkiError, match="--addr"):
        issue_node(tmp_path, "n1", addresses)
    assert not (tmp_path / "n1.key").exists()


def test_issue_node_without_a_ca_says_how_to_make_one(tmp_path):
    with pytest.raises(PkiError, match="fednode ca init"):
        issue_node(tmp_path, "n1", ["127.0.0.1"])


def test_reissue_overwrites_for_rotation(tmp_path):
    make_ca(tmp_path)
    first = issue_node(tmp_path, "n1", ["127.0.0.1"])
    old_key, old_cert = first.key_path.read_bytes(), first.cert_path.read_bytes()
    again = issue_node(tmp_path, "n1", ["127.0.0.2"])
    assert again.key_path.read_bytes() != old_key and again.cert_path.read_bytes() != old_cert
    assert load_identity(again.cert_path, again.key_path, again.ca_path).node_id == "n1"


def test_load_identity_happy_path(tmp_path):
    ident = make_mesh(tmp_path, ("n1",))["n1"]
    assert ident.node_id == "n1"
    assert ident.cert_der == ident.certificate.public_bytes(serialization.Encoding.DER)
    assert ident.ca_pem == (tmp_path / "ca.crt").read_bytes()
    assert ident.not_after == ident.certificate.not_valid_after_utc
    assert ident.not_after > dt.datetime.now(dt.UTC) + dt.timedelta(days=300)
    assert b"PRIVATE" not in repr(ident).encode()
    trust = TrustStore(ident.ca_pem)
    assert trust.verify_signature(ident.cert_der, b"data", ident.sign(b"data")) == "n1"
    assert certificate_expiry(ident.cert_pem) == ident.not_after
    assert certificate_expiry(ident.cert_der) == ident.not_after


def test_load_identity_missing_file_names_it_and_the_fix(tmp_path):
    make_ca(tmp_path)
    files = issue_node(tmp_path, "n1", ["127.0.0.1"])
    files.key_path.unlink()
    with pytest.raises(PkiError) as err:
        load_identity(files.cert_path, files.key_path, files.ca_path)
    assert str(files.key_path) in str(err.value) and "does not exist" in str(err.value)
    assert "fednode ca issue" in str(err.value)
    with pytest.raises(PkiError, match="mesh CA certificate .* does not exist"):
        load_identity(files.cert_path, files.cert_path, tmp_path / "nope.crt")


def test_load_identity_refuses_a_certificate_from_a_foreign_ca(tmp_path):
    make_ca(tmp_path / "a")
    make_ca(tmp_path / "b")
    foreign = issue_node(tmp_path / "b", "n1", ["127.0.0.1"])
    with pytest.raises(PkiError) as err:
        load_identity(foreign.cert_path, foreign.key_path, tmp_path / "a" / "ca.crt")
    msg = str(err.value)
    assert "was not issued by the mesh CA" in msg and "fednode ca issue" in msg
    assert str(foreign.cert_path) in msg


def test_load_identity_refuses_a_key_that_does_not_match(tmp_path):
    make_ca(tmp_path)
    n1 = issue_node(tmp_path, "n1", ["127.0.0.1"])
    n2 = issue_node(tmp_path, "n2", ["127.0.0.1"])
    with pytest.raises(PkiError) as err:
        load_identity(n1.cert_path, n2.key_path, n1.ca_path)
    assert "does not belong to certificate" in str(err.value) and "fednode ca issue" in str(err.value)


def test_load_identity_refuses_an_expired_certificate(tmp_path):
    make_ca(tmp_path)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    files = _issue_node(tmp_path, "old", ["127.0.0.1"], not_before=past,
                        not_after=past + dt.timedelta(days=1))
    with pytest.raises(PkiError) as err:
        load_identity(files.cert_path, files.key_path, files.ca_path)
    assert "expired" in str(err.value) and "fednode ca issue" in str(err.value)


def test_load_identity_refuses_garbage_files(tmp_path):
    make_ca(tmp_path)
    files = issue_node(tmp_path, "n1", ["127.0.0.1"])
    files.cert_path.write_bytes(b"not a certificate")
    with pytest.raises(PkiError, match="not a PEM certificate.*fednode ca issue"):
        load_identity(files.cert_path, files.key_path, files.ca_path)


def test_load_identity_refuses_the_ca_certificate_as_node_certificate(tmp_path):
    make_ca(tmp_path)
    with pytest.raises(PkiError, match="CA certificate, not a node certificate"):
        load_identity(tmp_path / "ca.crt", tmp_path / "ca.key", tmp_path / "ca.crt")


def test_load_identity_warns_about_a_group_readable_key(tmp_path, caplog):
    make_ca(tmp_path)
    files = issue_node(tmp_path, "n1", ["127.0.0.1"])
    with caplog.at_level(logging.WARNING, logger="fednode.security.pem_files"):
        load_identity(files.cert_path, files.key_path, files.ca_path)
    assert not caplog.records
    os.chmod(files.key_path, 0o640)
    with caplog.at_level(logging.WARNING, logger="fednode.security.pem_files"):
        load_identity(files.cert_path, files.key_path, files.ca_path)
    assert any("chmod 600" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- TrustStore


def _reason(err: pytest.ExceptionInfo) -> str:
    return Reason.Name(err.value.reason)


def test_trust_store_accepts_mesh_certificates_and_refuses_foreign_ones(tmp_path):
    mesh = make_mesh(tmp_path / "a")
    foreign = make_mesh(tmp_path / "b", ("n1",))["n1"]
    trust = TrustStore(mesh["n1"].ca_pem)
    assert trust.verify_certificate(mesh["n1"].cert_der) == "n1"
    assert trust.verify_certificate(mesh["n2"].cert_der) == "n2"
    with pytest.raises(ProtocolError) as err:
        trust.verify_certificate(foreign.cert_der)
    assert _reason(err) == "BAD_CERTIFICATE" and "not issued by this mesh" in str(err.value)
    with pytest.raises(ProtocolError) as err:
        trust.verify_certificate(b"\x30\x03garbage")
    assert _reason(err) == "BAD_CERTIFICATE"
    ca_der = x509.load_pem_x509_certificate(mesh["n1"].ca_pem).public_bytes(serialization.Encoding.DER)
    with pytest.raises(ProtocolError, match="CA certificate") as err:
        trust.verify_certificate(ca_der)
    assert _reason(err) == "BAD_CERTIFICATE"


def test_trust_store_checks_validity_at_the_given_time(tmp_path):
    ident = make_mesh(tmp_path, ("n1",))["n1"]
    trust = TrustStore(ident.ca_pem)
    assert trust.verify_certificate(ident.cert_der) == "n1"  # cached now; validity still re-checked
    for when in (ident.not_after + dt.timedelta(seconds=1), dt.datetime(2000, 1, 1, tzinfo=dt.UTC)):
        with pytest.raises(ProtocolError) as err:
            trust.verify_certificate(ident.cert_der, now=when)
        assert _reason(err) == "BAD_CERTIFICATE"


def test_trust_store_refuses_bad_signatures(tmp_path):
    mesh = make_mesh(tmp_path)
    n1, n2 = mesh["n1"], mesh["n2"]
    trust = TrustStore(n1.ca_pem)
    sig = n1.sign(b"payload")
    assert trust.verify_signature(n1.cert_der, b"payload", sig) == "n1"
    for cert, data, signature in [(n1.cert_der, b"payl0ad", sig),  # altered data
                                  (n2.cert_der, b"payload", sig),  # someone else's certificate
                                  (n1.cert_der, b"payload", b"\x00" * 70)]:  # garbage
        with pytest.raises(ProtocolError) as err:
            trust.verify_signature(cert, data, signature)
        assert _reason(err) == "BAD_SIGNATURE"


def test_trust_store_cache_is_bounded_and_accepts_a_ca_bundle(tmp_path):
    make_ca(tmp_path / "a")
    make_ca(tmp_path / "b")
    a1, a2 = make_identity(tmp_path / "a", "a1"), make_identity(tmp_path / "a", "a2")
    b1 = make_identity(tmp_path / "b", "b1")
    trust = TrustStore(a1.ca_pem + b1.ca_pem, cache_size=2)  # e.g. during a CA rotation
    assert [trust.verify_certificate(i.cert_der) for i in (a1, a2, b1, a1)] == ["a1", "a2", "b1", "a1"]
    assert len(trust._cache) == 2


def test_trust_store_refuses_a_bundle_without_ca(tmp_path):
    ident = make_mesh(tmp_path, ("n1",))["n1"]
    with pytest.raises(PkiError, match="not a CA"):
        TrustStore(ident.cert_pem)
    with pytest.raises(PkiError, match="no certificate"):
        TrustStore(b"nothing here")


def _corruptions(der: bytes):
    """Every position set to a few values, the byte flips that broke the parser's error types."""
    for i in range(len(der)):
        for value in {0x00, 0x01, 0x02, 0x03, 0xFF, der[i] ^ 0x01} - {der[i]}:
            yield der[:i] + bytes([value]) + der[i + 1:]


def test_every_single_byte_corruption_of_a_peers_certificate_is_a_typed_refusal(tmp_path):
    # a fuzzed run found a flipped version byte escaping as cryptography's InvalidVersion (not a
    # ValueError); a flipped signature OID gives UnsupportedAlgorithm, lazily read fields KeyError
    ident = make_mesh(tmp_path, ("n1",))["n1"]
    trust = TrustStore(ident.ca_pem)
    refused = 0
    for der in _corruptions(ident.cert_der):
        try:
            assert trust.verify_certificate(der) == "n1"  # a flip the DER encoding tolerates
        except ProtocolError as exc:
            assert exc.reason == Reason.BAD_CERTIFICATE
            refused += 1
    assert refused > 0.9 * 5 * len(ident.cert_der)
