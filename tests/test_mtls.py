"""Mutual TLS over real gRPC servers on loopback: mesh members get through, nobody else does."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from helpers_pki import make_ca, make_identity, make_mesh

from fednode.errors import PkiError
from fednode.security import tls

SERVICE, METHOD = "fednode.test.Echo", "/fednode.test.Echo/Call"
TIMEOUT = 5


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    nodes = make_mesh(tmp_path_factory.mktemp("mesh"), ("n1", "n2"))
    foreign = make_mesh(tmp_path_factory.mktemp("foreign"), ("n2",))["n2"]
    return {**nodes, "foreign": foreign}


def _handler(seen: list):
    def call(request: bytes, context) -> bytes:
        seen.append((tls.peer_node_id(context), tls.peer_certificate_der(context)))
        return b"pong:" + request[:16]

    return grpc.method_handlers_generic_handler(SERVICE, {"Call": grpc.unary_unary_rpc_method_handler(call)})


@contextmanager
def serving(credentials: grpc.ServerCredentials, seen: list) -> Iterator[int]:
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=tls.server_options())
    server.add_generic_rpc_handlers((_handler(seen),))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def _call(port: int, credentials: grpc.ChannelCredentials, options=None, payload=b"ping") -> bytes:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                             options=options if options is not None else tls.channel_options()) as channel:
        return channel.unary_unary(METHOD)(payload, timeout=TIMEOUT)


def _refused(port: int, credentials: grpc.ChannelCredentials, options=None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _call(port, credentials, options)
    return err.value.code()


def test_mesh_client_gets_through_and_the_server_knows_who_it_is(mesh):
    seen: list = []
    with serving(tls.server_credentials(mesh["n1"]), seen) as port:
        assert _call(port, tls.channel_credentials(mesh["n2"])) == b"pong:ping"
    assert seen == [("n2", mesh["n2"].cert_der)]


def test_channel_options_raise_the_message_limit(mesh):
    big = b"x" * (6 << 20)  # above gRPC's 4 MiB default receive limit
    with serving(tls.server_credentials(mesh["n1"]), []) as port:
        assert _call(port, tls.channel_credentials(mesh["n2"]), payload=big) == b"pong:" + big[:16]


def test_target_node_id_pins_the_servers_identity(mesh):
    with serving(tls.server_credentials(mesh["n1"]), []) as port:
        creds = tls.channel_credentials(mesh["n2"])
        assert _call(port, creds, tls.channel_options(target_node_id="n1")) == b"pong:ping"
        assert _refused(port, creds, tls.channel_options(target_node_id="n2")) == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(mesh):
    seen: list = []
    with serving(tls.server_credentials(mesh["n1"]), seen) as port:
        anonymous = grpc.ssl_channel_credentials(root_certificates=mesh["n1"].ca_pem)
        assert _refused(port, anonymous) == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_client_with_a_certificate_from_another_ca_is_refused(mesh):
    seen: list = []
    with serving(tls.server_credentials(mesh["n1"]), seen) as port:
        outsider = grpc.ssl_channel_credentials(root_certificates=mesh["n1"].ca_pem,  # trusts our server
                                                private_key=mesh["foreign"].key_pem,
                                                certificate_chain=mesh["foreign"].cert_pem)
        assert _refused(port, outsider) == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_client_that_trusts_another_ca_refuses_the_server(mesh):
    seen: list = []
    with serving(tls.server_credentials(mesh["n1"]), seen) as port:
        suspicious = grpc.ssl_channel_credentials(root_certificates=mesh["foreign"].ca_pem,
                                                  private_key=mesh["n2"].key_pem,  # a valid mesh client cert
                                                  certificate_chain=mesh["n2"].cert_pem)
        assert _refused(port, suspicious) == grpc.StatusCode.UNAVAILABLE
    assert seen == []


def test_aio_server_sees_the_peer_identity(mesh):
    async def scenario() -> list:
        seen: list = []
        server = grpc.aio.server(options=tls.server_options())
        server.add_generic_rpc_handlers((_handler(seen),))
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(mesh["n1"]))
        await server.start()
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", tls.channel_credentials(mesh["n2"]),
                                               options=tls.channel_options()) as channel:
                assert await channel.unary_unary(METHOD)(b"ping", timeout=TIMEOUT) == b"pong:ping"
        finally:
            await server.stop(None)
        return seen

    assert asyncio.run(scenario()) == [("n2", mesh["n2"].cert_der)]


def test_rotating_credentials_serve_a_reissued_certificate_without_restart(tmp_path, mesh):
    old_ca, new_ca = make_ca(tmp_path / "old"), make_ca(tmp_path / "new")
    old, old_client = make_identity(old_ca, "n1"), make_identity(old_ca, "n2")
    new, new_client = make_identity(new_ca, "n1"), make_identity(new_ca, "n2")
    current = [old]
    with serving(tls.rotating_server_credentials(lambda: current[0]), []) as port:
        assert _call(port, tls.channel_credentials(old_client)) == b"pong:ping"
        current[0] = new  # e.g. reloaded after `fednode ca issue` (here: also a new CA)
        assert _refused(port, tls.channel_credentials(old_client)) == grpc.StatusCode.UNAVAILABLE
        assert _call(port, tls.channel_credentials(new_client)) == b"pong:ping"


def test_expired_identity_gets_no_credentials(mesh):
    expired = dataclasses.replace(mesh["n1"], not_after=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
    with pytest.raises(PkiError, match="expired.*fednode ca issue"):
        tls.server_credentials(expired)
    with pytest.raises(PkiError, match="expired"):
        tls.channel_credentials(expired)


def test_forget_drops_the_cached_channel_so_a_restarted_peer_is_dialled_afresh(mesh):
    """A channel to a peer that was down sits in reconnect backoff; `forget` (called when the
    peer's new incarnation is first seen) makes the next call open a new one."""
    from fednode.transport.grpc_transport import GrpcTransport

    async def main() -> None:
        transport = GrpcTransport(mesh["n1"])
        first = transport._channel("127.0.0.1:9")
        assert transport._channel("127.0.0.1:9") is first  # cached
        transport.forget("127.0.0.1:9")
        transport.forget("127.0.0.1:10")  # nothing cached there: nothing to do
        assert transport._channel("127.0.0.1:9") is not first
        await transport.close(0)

    asyncio.run(main())
