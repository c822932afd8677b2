#!/usr/bin/env python3
"""Container health check: ask the node's own peer port for grpc.health.v1 status, over mTLS.

    python healthcheck.py [--config /etc/fednode/fednode.toml] [--address HOST:PORT] [--timeout 5]

Exit 0 when the node answers SERVING, 1 otherwise (one line on stderr says why). The peer port
only talks mutual TLS, so the check presents the node's own certificate (node certificates are
valid for client and server auth) and checks the server's certificate against the node's name,
which every fednode certificate carries as a DNS name: dialling 127.0.0.1 works whatever
addresses the certificate was issued for. It imports neither torch nor the daemon: well under a
second of CPU per check.

Used by deploy/docker/Dockerfile (HEALTHCHECK) and deploy/k8s/statefulset.yaml (exec probes).
The config path defaults to $FEDNODE_CONFIG, then /etc/fednode/fednode.toml.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = "/etc/fednode/fednode.toml"
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "[::]": "[::1]", "::": "[::1]"}


def local_target(listen: str) -> str:
    """Where to dial the node from inside its own container/host: wildcard listens become loopback."""
    host, _, port = listen.rpartition(":")
    return f"{_WILDCARDS.get(host, host)}:{port}"


def check(config_path: Path, address: str | None, timeout: float) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from fednode.config import load_config
    from fednode.errors import FednodeError
    from fednode.security import tls
    from fednode.security.identity import load_identity

    try:
        cfg = load_config(config_path)
        identity = load_identity(cfg.tls.cert, cfg.tls.key, cfg.tls.ca)
        credentials = tls.channel_credentials(identity)
    except FednodeError as exc:
        return False, str(exc)
    target = address or local_target(cfg.node.listen)
    options = tls.channel_options(target_node_id=identity.node_id)
    try:
        with grpc.secure_channel(target, credentials, options=options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                              timeout=timeout)
    except grpc.RpcError as exc:
        return False, f"{target}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{identity.node_id} at {target}: {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="gRPC health check of a fednode peer port (mTLS)")
    parser.add_argument("--config", type=Path, default=Path(os.environ.get("FEDNODE_CONFIG", DEFAULT_CONFIG)),
                        help="node config (its [tls] files are used as the client certificate)")
    parser.add_argument("--address", help="HOST:PORT to check (default: [node] listen, on loopback)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--quiet", action="store_true", help="print nothing when healthy")
    args = parser.parse_args(argv)
    healthy, message = check(args.config, args.address, args.timeout)
    if not healthy:
        print(f"fednode-healthcheck: unhealthy: {message}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"fednode-healthcheck: {message}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
