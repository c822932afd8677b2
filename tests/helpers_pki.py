"""Test helpers: build throw-away meshes (CA + node identities) in tmp dirs; no certs in the repo."""

from __future__ import annotations

from pathlib import Path

from fednode.security.ca import init_ca, issue_node
from fednode.security.identity import NodeIdentity, load_identity

LOOPBACK = ["127.0.0.1", "localhost"]


def make_ca(directory: Path, name: str = "test mesh CA") -> Path:
    init_ca(directory, name=name)
    return directory


def make_identity(ca_dir: Path, name: str, addresses: list[str] | None = None) -> NodeIdentity:
    files = issue_node(ca_dir, name, addresses or LOOPBACK)
    return load_identity(files.cert_path, files.key_path, files.ca_path)


def make_mesh(directory: Path, names: tuple[str, ...] = ("n1", "n2")) -> dict[str, NodeIdentity]:
    make_ca(directory)
    return {name: make_identity(directory, name) for name in names}


# HelloBody fields for tests of other parts than liveness: every heartbeat up to the base is
# covered by the signed Hello itself, so records need no hash-chain proof (test_membership
# covers the chain).
UNCHAINED = {"heartbeat_anchor": bytes(32), "heartbeat_base": 2**20}
