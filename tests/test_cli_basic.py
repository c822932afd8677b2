"""Command line basics: help, init, ca, and one-line errors with numbered exit codes."""

from __future__ import annotations

import os
import stat

from click.testing import CliRunner, Result
from cryptography import x509

from fednode.cli import main
from fednode.config import load_config
from fednode.errors import ExitCode
from fednode.security.identity import load_identity


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line_error(result: Result, code: int | None) -> str:
    """`code` None: any failure code will do."""
    if code is None:
        assert result.exit_code not in (0, None), result.output
    else:
        assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fednode: error: ")
    assert "Traceback" not in result.output
    return lines[0]


def test_help_lists_the_commands():
    for flag in ("--help", "-h"):
        result = invoke(flag)
        assert result.exit_code == 0
        commands = result.output.split("Commands:")[1]
        for name in ("ca", "check", "demo", "drain", "init", "peers", "run", "status"):
            assert f"\n  {name} " in commands, name
    ca_help = invoke("ca", "--help")
    assert ca_help.exit_code == 0 and "init" in ca_help.output and "issue" in ca_help.output


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.startswith("fednode, version ")


def test_init_writes_a_config_that_loads_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "site-b.toml"
    result = invoke("init", "--path", str(path), "--name", "site-b", "--listen", "127.0.0.1:7801",
                    "--seed", "127.0.0.1:7700", "--seed", "127.0.0.1:7701")
    assert result.exit_code == 0, result.output
    assert str(path) in result.stdout
    cfg = load_config(path)
    assert cfg.node.name == "site-b" and cfg.node.listen == "127.0.0.1:7801"
    assert cfg.mesh.seeds == ("127.0.0.1:7700", "127.0.0.1:7701")
    assert cfg.tls.cert == tmp_path / "pki" / "site-b.crt"

    path.write_text("# edited by the operator\n" + path.read_text())
    edited = path.read_text()
    result = invoke("init", "--path", str(path))
    line = one_line_error(result, ExitCode.USAGE)
    assert "already exists" in line and "--force" in line
    assert path.read_text() == edited  # untouched

    result = invoke("init", "--path", str(path), "--force", "--name", "site-c")
    assert result.exit_code == 0
    assert load_config(path).node.name == "site-c"


def test_init_defaults_to_fednode_toml_in_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("init").exit_code == 0
    assert load_config(tmp_path / "fednode.toml").node.name == "site-a"


def test_init_creates_missing_directories(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "n.toml"
    assert invoke("init", "--path", str(target)).exit_code == 0
    assert load_config(target).node.name == "site-a"


def test_init_under_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke("init", "--path", str(tmp_path / "afile" / "n.toml"))
    line = one_line_error(result, 2)
    assert "n.toml" in line


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ca_init_and_issue_create_keys_with_mode_0600(tmp_path):
    ca_dir = tmp_path / "pki"
    result = invoke("ca", "init", "--dir", str(ca_dir), "--name", "acme mesh")
    assert result.exit_code == 0, result.output
    assert _mode(ca_dir / "ca.key") == 0o600
    assert (ca_dir / "ca.crt").exists()

    result = invoke("ca", "issue", "--dir", str(ca_dir), "site-a", "--addr", "127.0.0.1, site-a.example")
    assert result.exit_code == 0, result.output
    assert "127.0.0.1, site-a.example" in result.stdout
    assert _mode(ca_dir / "site-a.key") == 0o600
    identity = load_identity(ca_dir / "site-a.crt", ca_dir / "site-a.key", ca_dir / "ca.crt")
    assert identity.node_id == "site-a"
    san = identity.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "site-a.example" in san.get_values_for_type(x509.DNSName)


def test_ca_init_refuses_to_replace_a_ca_with_a_pki_error(tmp_path):
    assert invoke("ca", "init", "--dir", str(tmp_path)).exit_code == 0
    key = (tmp_path / "ca.key").read_bytes()
    line = one_line_error(invoke("ca", "init", "--dir", str(tmp_path)), ExitCode.PKI)
    assert "--force" in line
    assert (tmp_path / "ca.key").read_bytes() == key


def test_ca_issue_without_a_ca_is_a_pki_error(tmp_path):
    line = one_line_error(invoke("ca", "issue", "--dir", str(tmp_path), "n1", "--addr", "127.0.0.1"), ExitCode.PKI)
    assert "fednode ca init" in line


def test_run_with_a_missing_config_exits_3_with_one_line(tmp_path):
    missing = tmp_path / "missing.toml"
    line = one_line_error(invoke("run", "--config", str(missing)), ExitCode.CONFIG)
    assert str(missing) in line and "fednode init" in line


def test_run_with_an_invalid_config_exits_3(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[node]\nname = "a"\n[mesh]\nfanuot = 2\n')
    line = one_line_error(invoke("run", "--config", str(path)), ExitCode.CONFIG)
    assert "did you mean 'fanout'" in line


def test_status_without_a_daemon_exits_7(tmp_path):
    line = one_line_error(invoke("status", "--socket", "/nonexistent.sock"), ExitCode.NOT_RUNNING)
    assert "/nonexistent.sock" in line
    for command in ("peers", "drain"):
        one_line_error(invoke(command, "--socket", str(tmp_path / "op.sock")), ExitCode.NOT_RUNNING)


def test_status_finds_the_socket_through_the_config(tmp_path):
    path = tmp_path / "n.toml"
    assert invoke("init", "--path", str(path)).exit_code == 0
    line = one_line_error(invoke("status", "--config", str(path)), ExitCode.NOT_RUNNING)
    assert str(tmp_path / "data" / "site-a" / "operator.sock") in line  # a data_dir per site


def test_status_needs_a_config_or_a_socket():
    line = one_line_error(invoke("status"), ExitCode.USAGE)
    assert "--config" in line and "--socket" in line


def test_a_metrics_port_in_use_is_a_one_line_network_error(tmp_path):
    """Not a traceback with exit 1 (systemd would restart it five times): NETWORK, naming the key."""
    import asyncio
    import socket

    import pytest

    from fednode.errors import NetworkError
    from fednode.node.daemon import Daemon
    from fednode.transport.memory import MemoryNetwork, MemoryTransport
    from tools.harness.sim import sim_configs

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        cfg = sim_configs(tmp_path, 1, overrides={"metrics": {"listen": f"127.0.0.1:{port}"},
                                                  "learning": {"mode": "local"}}, code_bytes=5_000)[0]
        network = MemoryNetwork()
        daemon = Daemon(cfg, lambda ident: MemoryTransport(network, ident.node_id))

        async def start_then_close() -> None:
            try:
                await daemon.start()
            finally:
                await daemon.close()  # what serve() does: the servers already started are stopped

        with pytest.raises(NetworkError) as err:
            asyncio.run(start_then_close())
    line = str(err.value)
    assert "\n" not in line and f"127.0.0.1:{port}" in line and "[metrics] listen" in line
    assert err.value.exit_code == ExitCode.NETWORK


def test_status_json_gives_64_bit_integers_as_numbers():
    """protobuf's JSON mapping writes int64 as strings; `status --json` must not."""
    from fednode.operator_client import _as_dict
    from fednode.v1 import operator_pb2 as opb

    reply = _as_dict(opb.StatusReply(round=2**40, epoch=3, bytes_sent=12, last_loss=1.5, node_id="a"))
    assert reply["round"] == 2**40 and reply["epoch"] == 3 and reply["bytes_sent"] == 12
    assert all(type(reply[k]) is int for k in ("round", "epoch", "bytes_sent", "bytes_received", "level"))
    assert reply["last_loss"] == 1.5 and reply["node_id"] == "a"


def test_exit_when_done_drains_and_returns_0_after_the_last_round(tmp_path):
    """A batch job: [train] rounds = 2 with exit_when_done ends the daemon with 0 by itself
    (without it the daemon serves peers until drained)."""
    import asyncio

    from fednode.node.daemon import Daemon
    from fednode.store.journal import Journal
    from fednode.transport.memory import MemoryNetwork, MemoryTransport
    from tools.harness.sim import sim_configs

    cfg = sim_configs(tmp_path, 1, overrides={"learning": {"mode": "local"}, "train": {"rounds": 2}},
                      code_bytes=5_000)[0]
    network = MemoryNetwork()
    daemon = Daemon(cfg, lambda ident: MemoryTransport(network, ident.node_id), exit_when_done=True)
    assert asyncio.run(asyncio.wait_for(daemon.serve(), 300)) == 0
    with Journal.open(cfg.node.data_dir / "journal.db") as journal:
        assert [r.round for r in journal.rounds()] == [1, 2]
