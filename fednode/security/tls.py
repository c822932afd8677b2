"""The one place that builds gRPC TLS credentials and channel options.

Mutual TLS with the mesh CA as the only root: a peer without a mesh certificate is refused
during the TLS handshake, before any RPC handler runs.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fednode.errors import PkiError
from fednode.security.certificates import CERT_PARSE_ERRORS, common_name
from fednode.security.identity import NodeIdentity

KEEPALIVE_TIME_MS = 30_000  # ping an idle connection every 30 s so dead peers are noticed
KEEPALIVE_TIMEOUT_MS = 10_000
MIN_PING_INTERVAL_MS = 10_000  # servers accept pings this often (below that they count strikes)


def _require_current(identity: NodeIdentity) -> None:
    if dt.datetime.now(dt.UTC) > identity.not_after:
        raise PkiError(f"certificate of {identity.node_id} expired at {identity.not_after:%Y-%m-%d %H:%M} "
                       f"UTC: re-issue it with `fednode ca issue {identity.node_id}` and reload")


def server_credentials(identity: NodeIdentity) -> grpc.ServerCredentials:
    """Server side of mutual TLS: present our certificate, require one from the mesh CA."""
    _require_current(identity)
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)],
                                       root_certificates=identity.ca_pem, require_client_auth=True)


def rotating_server_credentials(current: Callable[[], NodeIdentity]) -> grpc.ServerCredentials:
    """Like server_credentials, but new handshakes pick up whatever `current()` returns now,
    so a re-issued certificate is served without restarting the server."""
    first = current()
    _require_current(first)

    def key_of(identity: NodeIdentity) -> tuple[bytes, bytes, bytes]:
        return (identity.cert_der, identity.key_pem, identity.ca_pem)  # a new CA bundle counts too

    served = [key_of(first)]

    def config(identity: NodeIdentity) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(identity.key_pem, identity.cert_pem)], root_certificates=identity.ca_pem)

    def fetch() -> Any:
        identity = current()
        if key_of(identity) == served[0]:
            return None  # unchanged: gRPC keeps the configuration it has
        served[0] = key_of(identity)
        return config(identity)

    return grpc.dynamic_ssl_server_credentials(config(first), fetch,
                                               require_client_authentication=True)


def channel_credentials(identity: NodeIdentity) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: trust only the mesh CA, present our certificate."""
    _require_current(identity)
    return grpc.ssl_channel_credentials(root_certificates=identity.ca_pem,
                                        private_key=identity.key_pem,
                                        certificate_chain=identity.cert_pem)


def channel_options(max_message: int = 8 * 1024 * 1024, *,
                    target_node_id: str | None = None) -> list[tuple[str, Any]]:
    """Options for a long-lived peer channel. `target_node_id` makes TLS check the server's
    certificate for that node name (every node certificate carries its name as a DNS SAN), so a
    peer can be dialled by any address (NAT, containers) and is still pinned to its identity."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 1_000),
        # a peer down for long is redialled at most this often; one that restarts is forgotten
        # (Transport.forget) and dialled at once
        ("grpc.max_reconnect_backoff_ms", 10_000),
    ]
    if target_node_id is not None:
        options.append(("grpc.ssl_target_name_override", target_node_id.lower()))
    return options


def server_options(max_message: int = 8 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Server options matching channel_options: without them the server answers our idle
    keepalive pings with GOAWAY (too_many_pings) and drops healthy connections."""
    return [
        ("grpc.max_send_message_length", max_message),
        ("grpc.max_receive_message_length", max_message),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 3),
    ]


def _auth_value(context: Any, key: str) -> bytes | None:
    try:
        values = context.auth_context().get(key)
    except (AttributeError, ValueError):
        return None
    return values[0] if values else None


def peer_certificate_der(context: Any) -> bytes | None:
    """The TLS client certificate of the caller (sync or aio ServicerContext), as DER."""
    pem = _auth_value(context, "x509_pem_cert")
    if pem is None:
        return None
    try:
        return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except CERT_PARSE_ERRORS:
        return None


def peer_node_id(context: Any) -> str | None:
    """The node id (certificate CN) of the caller, or None on an unauthenticated connection."""
    cn = _auth_value(context, "x509_common_name")
    if cn:
        return cn.decode("utf-8", "replace")
    der = peer_certificate_der(context)
    if der is None:
        return None
    return common_name(x509.load_der_x509_certificate(der))
