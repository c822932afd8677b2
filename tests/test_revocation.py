"""Certificate revocation: the CA's signed list, newer-wins adoption, refusal everywhere, and a
3-daemon mesh where a list installed on one node shuts the revoked node out of every node."""

from __future__ import annotations

import datetime as dt
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from helpers_pki import UNCHAINED, make_ca, make_identity

from fednode.cli import main
from fednode.config import example_config, parse_config
from fednode.errors import ConfigError, ExitCode, PkiError, ProtocolError, Reason
from fednode.launcher import LocalMesh, free_ports
from fednode.mesh.membership import Membership
from fednode.operator_client import fetch_peers
from fednode.security.ca import init_ca, issue_node
from fednode.security.hello import sign_hello
from fednode.security.revocation import (
    CRL_FILE,
    RevokedCertificate,
    load_revocation_list,
    revoke_certificate,
    verify_revocation_list,
)
from fednode.security.trust import TrustStore
from fednode.store.journal import Journal
from fednode.v1 import peer_pb2 as pb

# ------------------------------------------------------------------------------------------ CA side


def _cas(ca_dir: Path) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())]


def test_revoke_writes_a_signed_crl_and_each_revocation_bumps_its_number(tmp_path):
    ca = make_ca(tmp_path / "pki")
    n1, n2 = make_identity(ca, "n1"), make_identity(ca, "n2")
    first = revoke_certificate(ca, "n1")
    assert (first.path, first.number, first.count, first.already) == (ca / CRL_FILE, 1, 1, False)
    assert first.serial == n1.certificate.serial_number
    assert (ca / CRL_FILE).read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert stat.S_IMODE(os.stat(ca / CRL_FILE).st_mode) == 0o644
    listed = load_revocation_list(ca / CRL_FILE, _cas(ca))
    assert listed.number == 1 and listed.revokes(n1.certificate.serial_number)
    assert not listed.revokes(n2.certificate.serial_number)

    second = revoke_certificate(ca, "n2", reason="key-compromise")
    assert (second.number, second.count) == (2, 2)
    listed = load_revocation_list(ca / CRL_FILE, _cas(ca))
    assert listed.serials == {n1.certificate.serial_number, n2.certificate.serial_number}
    crl = x509.load_pem_x509_crl((ca / CRL_FILE).read_bytes())
    reasons = {e.serial_number: e.extensions.get_extension_for_class(x509.CRLReason).value.reason for e in crl}
    assert reasons[n2.certificate.serial_number] == x509.ReasonFlags.key_compromise

    again = revoke_certificate(ca, "n2")
    assert again.already and again.number == 2  # nothing changed, no new number
    assert load_revocation_list(ca / CRL_FILE, _cas(ca)).number == 2


def test_revoke_by_serial_covers_a_certificate_that_was_reissued_since(tmp_path):
    ca = make_ca(tmp_path)
    old = make_identity(ca, "n1")
    new = make_identity(ca, "n1")  # re-issued: n1.crt is the new one now
    done = revoke_certificate(ca, serial=old.certificate.serial_number)
    listed = load_revocation_list(ca / CRL_FILE, _cas(ca))
    assert done.name is None and listed.revokes(old.certificate.serial_number)
    assert not listed.revokes(new.certificate.serial_number)


def test_revoke_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(PkiError, match="ca init"):
        revoke_certificate(tmp_path / "nothing", "n1")
    ca = make_ca(tmp_path / "pki")
    with pytest.raises(PkiError, match=r"n9\.crt does not exist.*--serial"):
        revoke_certificate(ca, "n9")
    with pytest.raises(PkiError, match="NAME or --serial"):
        revoke_certificate(ca)
    (ca / CRL_FILE).write_bytes(b"garbage")
    make_identity(ca, "n1")
    with pytest.raises(PkiError, match="revocation list .* is refused"):
        revoke_certificate(ca, "n1")


def test_verify_refuses_foreign_garbage_and_unnumbered_lists(tmp_path):
    ca, other = make_ca(tmp_path / "ca"), make_ca(tmp_path / "other", name="other mesh CA")
    make_identity(other, "n1")
    revoke_certificate(other, "n1")
    foreign = (other / CRL_FILE).read_bytes()
    with pytest.raises(ProtocolError) as err:
        verify_revocation_list(foreign, _cas(ca))
    assert err.value.reason == Reason.BAD_SIGNATURE
    with pytest.raises(ProtocolError) as err:
        verify_revocation_list(b"\x30\x03junk", _cas(ca))
    assert err.value.reason == Reason.MALFORMED
    # signed by the right CA but without a CRL number: not ours
    ca_key = serialization.load_pem_private_key((ca / "ca.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    bare = (x509.CertificateRevocationListBuilder().issuer_name(_cas(ca)[0].subject).last_update(now)
            .next_update(now + dt.timedelta(days=1)).sign(ca_key, hashes.SHA256()))
    with pytest.raises(ProtocolError) as err:
        verify_revocation_list(bare.public_bytes(serialization.Encoding.DER), _cas(ca))
    assert err.value.reason == Reason.MALFORMED
    # a file is a PkiError naming it and the fix
    (tmp_path / "bad.crl").write_bytes(foreign)
    with pytest.raises(PkiError, match=r"bad\.crl is refused .*fednode ca revoke"):
        load_revocation_list(tmp_path / "bad.crl", _cas(ca))


# ---------------------------------------------------------------------------------------- TrustStore


def _snapshots(ca: Path, *names: str) -> list[bytes]:
    """The CA's revocation list (DER) after revoking each name in turn."""
    out = []
    for name in names:
        revoke_certificate(ca, name)
        out.append(x509.load_pem_x509_crl((ca / CRL_FILE).read_bytes()).public_bytes(serialization.Encoding.DER))
    return out


def test_trust_store_adopts_only_newer_lists_and_refuses_forged_ones_once(tmp_path):
    ca = make_ca(tmp_path / "ca")
    for name in ("n1", "n2", "n3"):
        make_identity(ca, name)
    first, second = _snapshots(ca, "n1", "n2")
    trust = TrustStore((ca / "ca.crt").read_bytes())
    assert trust.consider_revocation_list(first).number == 1
    assert trust.consider_revocation_list(first) is None  # the same list again
    assert trust.consider_revocation_list(second).number == 2
    assert trust.consider_revocation_list(first) is None  # older: ignored
    assert trust.revocation.number == 2
    # order does not matter: every node converges on the newest
    late = TrustStore((ca / "ca.crt").read_bytes())
    assert late.consider_revocation_list(second).number == 2 and late.consider_revocation_list(first) is None
    assert late.revocation.der == trust.revocation.der

    other = make_ca(tmp_path / "other", name="other mesh CA")
    make_identity(other, "n1")
    forged = _snapshots(other, "n1")[0]
    with pytest.raises(ProtocolError):
        trust.consider_revocation_list(forged)
    assert trust.consider_revocation_list(forged) is None  # refused once, then ignored cheaply
    assert trust.revocation.number == 2


def test_revoked_certificate_is_refused_for_certificates_and_signatures(tmp_path):
    ca = make_ca(tmp_path)
    bad, good = make_identity(ca, "n1"), make_identity(ca, "n2")
    trust = TrustStore(bad.ca_pem)
    assert trust.verify_certificate(bad.cert_der) == "n1"  # cached as valid before the revocation
    trust.consider_revocation_list(_snapshots(ca, "n1")[0])
    with pytest.raises(RevokedCertificate) as err:
        trust.verify_certificate(bad.cert_der)
    assert err.value.reason == Reason.BAD_CERTIFICATE and "revoked" in err.value.detail
    assert err.value.revocation_list == trust.revocation.der  # the proof travels with the refusal
    with pytest.raises(ProtocolError, match="revoked"):
        trust.verify_signature(bad.cert_der, b"data", bad.sign(b"data"))
    assert trust.verify_signature(good.cert_der, b"data", good.sign(b"data")) == "n2"
    assert trust.is_revoked(bad.cert_der) and not trust.is_revoked(good.cert_der)


def test_a_new_ca_drops_a_list_it_did_not_sign(tmp_path):
    ca, new_ca = make_ca(tmp_path / "ca"), make_ca(tmp_path / "new", name="new mesh CA")
    make_identity(ca, "n1")
    trust = TrustStore((ca / "ca.crt").read_bytes())
    trust.consider_revocation_list(_snapshots(ca, "n1")[0])
    bundle = (ca / "ca.crt").read_bytes() + (new_ca / "ca.crt").read_bytes()
    assert trust.set_ca_pem(bundle) and trust.revocation is not None  # rotation bundle: still signed by a CA
    assert not trust.set_ca_pem((new_ca / "ca.crt").read_bytes()) and trust.revocation is None


# ---------------------------------------------------------------------------------------- membership


def test_membership_drops_revoked_peers_refuses_their_records_and_gossips_the_list(tmp_path):
    ca = make_ca(tmp_path)
    ids = {name: make_identity(ca, name) for name in ("n1", "n2", "n3")}

    def hello_of(name: str) -> tuple[pb.HelloBody, pb.SignedHello]:
        body = pb.HelloBody(node_id=name, protocol_version=1, tokenizer_hash="t", family_hash="f",
                            payload_public_key=os.urandom(32), address=f"127.0.0.1:{7700 + int(name[1:])}",
                            incarnation=1, **UNCHAINED)
        return body, sign_hello(ids[name], body)

    body, hello = hello_of("n1")
    view = Membership(hello, body, TrustStore(ids["n1"].ca_pem), suspect_after=6, dead_after=20)
    records = [pb.PeerRecord(hello=hello_of(n)[1], heartbeat=3) for n in ("n2", "n3")]
    view.merge(pb.Digest(sender_id="n2", records=records))
    assert set(view.members) == {"n2", "n3"} and view.digest().revocation_list == b""

    view.trust.consider_revocation_list(_snapshots(ca, "n3")[0])
    assert view.purge_revoked() == ["n3"] and set(view.members) == {"n2"}
    assert view.digest().revocation_list == view.trust.revocation.der
    relayed = view.merge(pb.Digest(sender_id="n2", records=[pb.PeerRecord(hello=records[1].hello, heartbeat=9)]))
    assert "n3" not in view.members
    assert [(peer, exc.reason) for peer, exc in relayed.refused] == [("n3", Reason.BAD_CERTIFICATE)]


# ------------------------------------------------------------------------------------- config / CLI


def test_tls_crl_config_key_is_optional_resolved_and_checked(tmp_path):
    raw = {"node": {"name": "site-a"}, "tls": {"crl": "pki/revoked.crl"}}
    assert parse_config(raw, tmp_path).tls.crl == tmp_path / "pki" / "revoked.crl"
    assert parse_config({"node": {"name": "site-a"}}, tmp_path).tls.crl is None
    with pytest.raises(ConfigError, match=r"\[tls\] crl .*revoked\.crl"):
        parse_config({"node": {"name": "a"}, "tls": {"cert": "a.crt", "crl": "a.crt"}}, tmp_path)
    assert "# crl = " in example_config()


def test_cli_ca_revoke(tmp_path):
    runner = CliRunner()
    pki_dir = tmp_path / "pki"
    assert runner.invoke(main, ["ca", "init", "--dir", str(pki_dir)]).exit_code == 0
    assert runner.invoke(main, ["ca", "issue", "--dir", str(pki_dir), "n1", "--addr", "127.0.0.1"]).exit_code == 0
    serial = x509.load_pem_x509_certificate((pki_dir / "n1.crt").read_bytes()).serial_number
    out = runner.invoke(main, ["ca", "revoke", "--dir", str(pki_dir), "n1"])
    assert out.exit_code == 0, out.output
    assert f"revoked n1 (serial {serial:x})" in out.output and "#1" in out.output
    again = runner.invoke(main, ["ca", "revoke", "--dir", str(pki_dir), "--serial", f"{serial:X}"])
    assert again.exit_code == 0 and "already revoked" in again.output

    for args, code in ((["ca", "revoke", "--dir", str(pki_dir)], ExitCode.USAGE),
                       (["ca", "revoke", "--dir", str(pki_dir), "--serial", "xyz"], ExitCode.USAGE),
                       (["ca", "revoke", "--dir", str(pki_dir), "n7"], ExitCode.PKI),
                       (["ca", "revoke", "--dir", str(tmp_path / "none"), "n1"], ExitCode.PKI)):
        result = runner.invoke(main, args)
        assert result.exit_code == code, (args, result.output)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fednode: error: "), result.stderr


def test_a_node_refuses_to_start_under_a_revoked_certificate_and_leaves_its_data_dir_alone(tmp_path):
    pki_dir = tmp_path / "pki"
    init_ca(pki_dir)
    issue_node(pki_dir, "site-a", ["127.0.0.1"])
    revoke_certificate(pki_dir, "site-a")
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "a.py").write_text("print(1)\n")
    config = tmp_path / "site-a.toml"
    text = example_config(name="site-a", listen="127.0.0.1:0")
    config.write_text(text.replace('# crl = "pki/revoked.crl"', 'crl = "pki/revoked.crl"'))
    out = subprocess.run([sys.executable, "-m", "fednode", "run", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == ExitCode.PKI, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("fednode: error: ")]
    assert len(errors) == 1 and "is revoked by the mesh CA" in errors[0] and "fednode ca issue" in errors[0]
    assert not (tmp_path / "data" / "journal.db").exists()  # nothing written but the lock


# ------------------------------------------------------------------------- a real 3-daemon mesh

FAST = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 64, "max_tokens": 20_000},
    "train": {"steps_per_round": 2, "batch_size": 4, "round_timeout_s": 6.0, "threads": 1, "catchup_lag": 2},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
NAMES = ("node-0", "node-1", "node-2")
START_TIMEOUT = 120.0


def bad_certificate_refusals(m: LocalMesh, name: str) -> float:
    import tomllib

    listen = tomllib.loads(m.node(name).config_path.read_text())["metrics"]["listen"]
    body = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    line = next((line for line in body.splitlines()
                 if line.startswith('fednode_rejected_messages_total{reason="BAD_CERTIFICATE"}')), None)
    return float(line.split()[1]) if line else 0.0


def peer_states(m: LocalMesh, name: str) -> dict[str, str]:
    return {p["node_id"]: p["state"] for p in fetch_peers(m.node(name).socket)["peers"]}


def wait_for(what: str, predicate, timeout: float, on_timeout=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}; {on_timeout()}"
        time.sleep(0.25)


def log_has(m: LocalMesh, name: str, text: str) -> bool:
    return text in m.node(name).log_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    m = LocalMesh.create(tmp_path_factory.mktemp("revocation"), 3, code_bytes=60_000, overrides=FAST)
    for name in ("node-0", "node-1"):
        m.configure(name, "metrics", listen=f"127.0.0.1:{free_ports(1)[0]}")
    with m.running(NAMES, START_TIMEOUT):
        yield m


def test_a_list_installed_on_one_node_spreads_and_every_node_refuses_the_revoked_one(mesh):
    pki_dir = mesh.workdir / "pki"
    survivors = ("node-0", "node-1")
    before = {n: bad_certificate_refusals(mesh, n) for n in survivors}
    out = subprocess.run([sys.executable, "-m", "fednode", "ca", "revoke", "--dir", str(pki_dir), "node-2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "revoked node-2" in out.stdout, out.stderr

    # only node-0 gets the list (config + SIGHUP); node-1 must learn it by gossip
    mesh.configure("node-0", "tls", crl=str(pki_dir / CRL_FILE))
    mesh.signal("node-0", signal.SIGHUP)
    for name in survivors:
        wait_for(f"{name} to drop node-2", lambda n=name: peer_states(mesh, n).get("node-2", "dead") == "dead", 60,
                 lambda n=name: mesh.log_tail(n))
        wait_for(f"{name} to count BAD_CERTIFICATE refusals",
                 lambda n=name: bad_certificate_refusals(mesh, n) > before[n], 60, lambda n=name: mesh.log_tail(n))
    crl = (pki_dir / CRL_FILE).read_bytes()
    for name in survivors:  # adopted and kept in the data dir (node-1 heard it only by gossip)
        assert (mesh.node(name).data_dir / CRL_FILE).read_bytes() == crl
    assert log_has(mesh, "node-1", "revocation list adopted")
    # the revoked node was told, verifiably, and says so
    wait_for("node-2 to learn it is revoked", lambda: log_has(mesh, "node-2", "this node's certificate"), 60,
             lambda: mesh.log_tail("node-2"))

    # the other two keep training together, without node-2
    marks = {n: int(mesh.status(n)["round"]) for n in survivors}
    for name in survivors:
        mesh.wait(name, lambda s, n=name: int(s["round"]) >= marks[n] + 2 and s["peers_alive"] == 1, 90)
        assert peer_states(mesh, name).get("node-2", "dead") == "dead"
    journal = Journal.open(mesh.node("node-0").data_dir / "journal.db")
    try:
        late = [r for r in journal.rounds() if r.round > marks["node-0"]]
    finally:
        journal.close()
    assert late and all("node-2" not in r.merged_from for r in late)


def test_the_revoked_node_cannot_restart_and_a_reissued_one_rejoins(mesh):
    node = mesh.node("node-2")
    assert mesh.stop("node-2", timeout=40) == 0
    journal = Journal.open(node.data_dir / "journal.db")
    rounds_before = [(r.round, r.checkpoint_sha256) for r in journal.rounds()]
    journal.close()
    size = node.log_path.stat().st_size
    proc = mesh.start("node-2")
    assert proc.wait(120) == ExitCode.PKI
    tail = node.log_path.read_bytes()[size:].decode(errors="replace")
    errors = [line for line in tail.splitlines() if line.startswith("fednode: error: ")]
    assert len(errors) == 1 and "is revoked" in errors[0] and "fednode ca issue" in errors[0], tail
    journal = Journal.open(node.data_dir / "journal.db")  # untouched
    assert [(r.round, r.checkpoint_sha256) for r in journal.rounds()] == rounds_before
    journal.close()

    issue_node(mesh.workdir / "pki", "node-2", ["127.0.0.1", "localhost"])  # a new certificate (new serial)
    mesh.start("node-2")
    mesh.wait("node-2", lambda s: s["peers_alive"] == 2, START_TIMEOUT)
    for name in ("node-0", "node-1"):
        mesh.wait(name, lambda s: s["peers_alive"] == 2, 60)
        assert peer_states(mesh, name)["node-2"] == "alive"
    mark = int(mesh.status("node-2")["round"])
    mesh.wait("node-2", lambda s: int(s["round"]) >= mark + 1, 90)


def test_every_single_byte_corruption_of_a_gossiped_list_is_a_typed_refusal(tmp_path):
    ca = make_ca(tmp_path / "pki")
    make_identity(ca, "n1")
    revoke_certificate(ca, "n1")
    der = x509.load_pem_x509_crl((ca / CRL_FILE).read_bytes()).public_bytes(serialization.Encoding.DER)
    refused = 0
    for i in range(len(der)):
        for value in {0x00, 0x01, 0x02, 0x03, 0xFF, der[i] ^ 0x01} - {der[i]}:
            try:
                verify_revocation_list(der[:i] + bytes([value]) + der[i + 1:], _cas(ca))
            except ProtocolError as exc:
                assert exc.reason in (Reason.MALFORMED, Reason.BAD_SIGNATURE)
                refused += 1
    assert refused > 0.9 * 5 * len(der)
