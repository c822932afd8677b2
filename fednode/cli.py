"""`fednode` command line: run a daemon, manage the mesh CA, talk to a running node, demo.

Every failure prints one line `fednode: error: ...` naming the problem and the fix, and exits
with a numbered code (fednode.errors.ExitCode). Heavy imports (torch, transformers, grpc) happen
inside the commands that need them, so `--help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import click

from fednode import __version__
from fednode.errors import ExitCode, FednodeError


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"fednode: error: {message}", err=True)
    sys.exit(int(code))


class _Group(click.Group):
    """Turns FednodeError anywhere below into one line and its exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FednodeError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", ExitCode.INTERRUPTED)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="fednode")
def main() -> None:
    """fednode: a peer-to-peer federated-learning daemon for code models.

    Each site runs one daemon next to its private code. Daemons form a mesh with no central
    server over mutually authenticated gRPC; only model updates travel, sealed end to end.

    \b
    Quick start:
      fednode demo                         # a 3-node mesh on loopback, about a minute
      fednode ca init --dir pki            # make a mesh CA (once per mesh)
      fednode ca issue --dir pki site-a --addr 10.0.0.5,site-a.example
      fednode init --path site-a.toml      # a commented example config
      fednode run --config site-a.toml
      fednode status --config site-a.toml
    """


# ---------------------------------------------------------------------------------------------- ca
@main.group(cls=_Group)
def ca() -> None:
    """Manage the mesh certificate authority and node certificates."""


@ca.command("init")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for ca.key (mode 0600) and ca.crt.")
@click.option("--name", default="fednode mesh CA", show_default=True, help="CA subject name.")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1), help="Validity in days.")
@click.option("--force", is_flag=True, help="Overwrite an existing CA (invalidates every node certificate).")
def ca_init(directory: Path, name: str, days: int, force: bool) -> None:
    """Create a mesh CA. Keep ca.key offline; give ca.crt to every site."""
    from fednode.security.ca import init_ca

    files = init_ca(directory, name=name, days=days, force=force)
    click.echo(f"created CA {files.cert_path} (key {files.key_path}, mode 0600)")


@ca.command("issue")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory holding the CA (from `fednode ca init`).")
@click.argument("name")
@click.option("--addr", required=True, help="Comma-separated IPs/hostnames peers use to reach the node (SANs).")
@click.option("--days", default=365, show_default=True, type=click.IntRange(1), help="Validity in days.")
def ca_issue(directory: Path, name: str, addr: str, days: int) -> None:
    """Issue (or re-issue) the key and certificate of node NAME."""
    from fednode.security.ca import issue_node

    addresses = [a.strip() for a in addr.split(",") if a.strip()]
    files = issue_node(directory, name, addresses, days=days)
    click.echo(f"issued {files.cert_path} (key {files.key_path}, mode 0600) for {', '.join(addresses)}")


def _serial(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip().lower().removeprefix("serial=").removeprefix("0x").replace(":", "")
    try:
        return int(text, 16)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a hex serial (e.g. 3a:5f:... or 3a5f...)") from None


@ca.command("revoke")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory holding the CA (from `fednode ca init`); revoked.crl is written there.")
@click.argument("name", required=False)
@click.option("--serial", "serial_text", default=None,
              help="Revoke this certificate serial (hex) instead of DIR/NAME.crt, e.g. an older certificate.")
@click.option("--reason", type=click.Choice(["unspecified", "key-compromise", "superseded",
                                             "cessation-of-operation"]),
              default="unspecified", show_default=True, help="Reason recorded in the revocation list.")
def ca_revoke(directory: Path, name: str | None, serial_text: str | None, reason: str) -> None:
    """Revoke the certificate of node NAME: add it to DIR/revoked.crl (signed by the CA).

    Install revoked.crl on any one node ([tls] crl = "...", then SIGHUP); it spreads to every
    node by gossip, and from then on they all refuse that certificate.
    """
    from fednode.security.revocation import revoke_certificate, serial_hex

    if name is None and serial_text is None:
        _fail("say which certificate to revoke: pass a node NAME or --serial HEX", ExitCode.USAGE)
    try:
        serial = _serial(serial_text)
    except click.BadParameter as exc:
        _fail(f"--serial {exc.message}", ExitCode.USAGE)
    done = revoke_certificate(directory, name, serial=serial, reason=reason)
    who = f"{name} (serial {serial_hex(done.serial)})" if name else f"serial {serial_hex(done.serial)}"
    count = f"{done.count} certificate" + ("s" if done.count != 1 else "")
    if done.already:
        click.echo(f"{who} was already revoked in {done.path} (revocation list #{done.number}, "
                   f"{count}): nothing changed")
        return
    click.echo(f"revoked {who}: {done.path} is now revocation list #{done.number} ({count}); "
               f"install it on any node ([tls] crl, then SIGHUP) and it spreads to the mesh by gossip")


# -------------------------------------------------------------------------------------------- init
@main.command("init")
@click.option("--path", type=click.Path(dir_okay=False, path_type=Path), default=Path("fednode.toml"),
              show_default=True, help="Where to write the example config.")
@click.option("--name", default="site-a", show_default=True, help="Node name (the certificate CN).")
@click.option("--listen", default="127.0.0.1:7700", show_default=True, help="Peer service address.")
@click.option("--seed", "seeds", multiple=True, help="Address of a mesh member (repeatable).")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def init_cmd(path: Path, name: str, listen: str, seeds: tuple[str, ...], force: bool) -> None:
    """Write a commented example node config."""
    from fednode.config import example_config

    if path.exists() and not force:
        _fail(f"{path} already exists: pass --force to overwrite it or choose another --path", ExitCode.USAGE)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(example_config(name=name, listen=listen, seeds=list(seeds)))
    except OSError as exc:
        _fail(f"cannot write {path} ({exc.strerror}): choose a writable --path", ExitCode.USAGE)
    click.echo(f"wrote {path}: edit [tls] and [data], then `fednode run --config {path}`")


# --------------------------------------------------------------------------------------------- run
@main.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Node config (TOML).")
@click.option("--exit-when-done", is_flag=True,
              help="Once [train] rounds are committed, drain and exit 0 (batch jobs) instead of serving peers.")
def run_cmd(config_path: Path, exit_when_done: bool) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT or `fednode drain`."""
    import asyncio

    from fednode.config import load_config
    from fednode.launcher import die_with_launcher

    die_with_launcher()
    from fednode.observability.logs import quiet_progress_bars, setup_logging

    cfg = load_config(config_path)
    setup_logging(cfg.node.name, cfg.log.level, cfg.log.format)
    quiet_progress_bars()
    from fednode.node.daemon import Daemon

    sys.exit(asyncio.run(Daemon(cfg, exit_when_done=exit_when_done).run()))


@main.command("check")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Node config (TOML) to check.")
def check_cmd(config_path: Path) -> None:
    """Preflight: what would stop or weaken this node, before it starts.

    One line per check (certificates and their expiry, revocation list, code to train on, model
    files, state directory, ports, operator socket); exits with the code `fednode run` would exit
    with at the first failure (0 when nothing fails; warnings do not fail).
    """
    from fednode.config import load_config
    from fednode.preflight import Level, exit_code, run_checks

    cfg = load_config(config_path)
    findings = run_checks(cfg)
    for finding in findings:
        click.echo(finding.line(), err=finding.level is Level.FAIL)
    code = exit_code(findings)
    failed = sum(f.level is Level.FAIL for f in findings)
    warned = sum(f.level is Level.WARN for f in findings)
    click.echo(f"{cfg.node.name}: {failed} failed, {warned} warnings, {len(findings) - failed - warned} ok")
    sys.exit(int(code))


# ------------------------------------------------------------------------------- operator commands
def _socket(config_path: Path | None, socket: Path | None) -> Path:
    if socket is not None:
        return socket
    if config_path is None:
        _fail("say which node: pass --config FILE or --socket PATH", ExitCode.USAGE)
    from fednode.config import load_config

    return load_config(config_path).operator_socket


def _target_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)
    f = click.option("--socket", type=click.Path(path_type=Path), help="Operator socket of the node.")(f)
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     help="Node config (to find its operator socket).")(f)
    return f


@main.command("status")
@_target_options
def status_cmd(config_path: Path | None, socket: Path | None, as_json: bool) -> None:
    """Show a running node's round, phase, peers and traffic."""
    from fednode.operator_client import fetch_status, render_status

    reply = fetch_status(_socket(config_path, socket))
    click.echo(json.dumps(reply, indent=2) if as_json else render_status(reply))


@main.command("peers")
@_target_options
def peers_cmd(config_path: Path | None, socket: Path | None, as_json: bool) -> None:
    """List the peers a running node knows, with their liveness."""
    from fednode.operator_client import fetch_peers, render_peers

    reply = fetch_peers(_socket(config_path, socket))
    click.echo(json.dumps(reply, indent=2) if as_json else render_peers(reply))


@main.command("drain")
@_target_options
def drain_cmd(config_path: Path | None, socket: Path | None, as_json: bool) -> None:
    """Ask a running node to finish its round cleanly, leave the mesh and exit."""
    from fednode.operator_client import request_drain

    accepted = request_drain(_socket(config_path, socket))
    click.echo(json.dumps({"accepted": accepted}) if as_json else "drain requested")


# ------------------------------------------------------------------------------------------ export
@main.command("export")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Node config (TOML): its data dir holds the journal and checkpoints.")
@click.option("--round", "round_", type=click.IntRange(0), default=None,
              help="Committed round to export [default: the newest in the node's journal].")
@click.option("--what", type=click.Choice(["private", "messenger", "merged"]), default="private",
              show_default=True,
              help="private: the site's own model P; messenger: the merged messenger (distilled family); "
                   "merged: the merged model itself (shared-prefix family, fedavg).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="New (or empty) directory for the Hugging Face files.")
def export_cmd(config_path: Path, round_: int | None, what: str, out: Path) -> None:
    """Write a node's model as a Hugging Face save_pretrained directory.

    The directory holds config.json, generation_config.json, model.safetensors and the tokenizer
    files: transformers' AutoModelForCausalLM / AutoTokenizer.from_pretrained(OUT) load it with
    no fednode code. Safe while the node runs (it reads a committed checkpoint).
    """
    from fednode.config import load_config
    from fednode.export import describe, export

    cfg = load_config(config_path)
    node_model, files = export(cfg, what, out, round_)
    params = sum(p.numel() for p in node_model.model.parameters())
    click.echo(f"exported {describe(what, cfg.learning.family)} of {node_model.node} at round {node_model.round} "
               f"(level {node_model.level}, {node_model.mode} mode, {params / 1e6:.2f} M params) to {out}: "
               f"{', '.join(files)}")


# -------------------------------------------------------------------------------------------- demo
# eager negotiation proposes at round 1, activates 3 rounds after acks: level 1 trains from round 5
DEMO_ADAPTIVE_ROUNDS = 6

@main.command("demo")
@click.option("--nodes", default=3, show_default=True, type=click.IntRange(2, 16), help="Daemons to start.")
@click.option("--rounds", default=None, type=click.IntRange(1, 1000),
              help="Rounds to run [default: 3; with --adaptive, 6: enough for a growth to be agreed and activate].")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(1), help="Local steps per round.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where CA, configs, data and node state go (default: a new temp dir, removed afterwards).")
@click.option("--base-port", default=0, type=click.IntRange(0, 65000), help="First peer port (0 = free ports).")
@click.option("--timeout", default=600.0, show_default=True, help="Give up after this many seconds.")
@click.option("--mode", type=click.Choice(["adaptive", "static", "fedavg", "local"]), default="adaptive",
              show_default=True, help="Learning mode of every node (see docs/learning.md).")
@click.option("--adaptive", "eager", is_flag=True,
              help="Adaptive mode with eager negotiation thresholds, so a capacity growth shows within a "
                   "few rounds (a demonstration setting, not a tuned one).")
def demo_cmd(nodes: int, rounds: int | None, steps: int, workdir: Path | None, base_port: int, timeout: float,
             mode: str, eager: bool) -> None:
    """Start a real mesh of daemons on loopback, train, and print a summary.

    Makes a fresh CA and certificates, splits Python's standard library by package into
    non-IID code partitions (one per node), starts each daemon as its own process over mTLS,
    runs the rounds with a progress display and prints per-node loss and traffic.
    """
    from fednode.demo import run_demo

    if rounds is None:
        rounds = DEMO_ADAPTIVE_ROUNDS if eager else 3
    sys.exit(run_demo(nodes=nodes, rounds=rounds, steps=steps, workdir=workdir, base_port=base_port,
                      timeout=timeout, mode="adaptive" if eager else mode, eager=eager))


if __name__ == "__main__":
    main()
