"""The local operator service (Status, Peers, Drain) on a unix socket next to the data.

It is plain gRPC without TLS: the socket lives in the 0700 data directory, so only the daemon's
user (and root) can reach it, and it never listens on the network.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from fednode import __version__
from fednode.errors import NetworkError
from fednode.node.context import NodeContext
from fednode.node.learner import Learner
from fednode.node.negotiator import Negotiator
from fednode.v1 import operator_pb2 as opb
from fednode.v1 import operator_pb2_grpc


def status_of(ctx: NodeContext, learner: Learner, negotiator: Negotiator) -> opb.StatusReply:
    counts = ctx.membership.counts()
    expires = ctx.identity.not_after.timestamp() - time.time()
    return opb.StatusReply(
        node_id=ctx.node_id, address=ctx.own_body.address, state=ctx.phase.value, round=ctx.committed_round,
        epoch=ctx.epoch, level=ctx.level, peers_alive=counts["alive"], peers_suspect=counts["suspect"],
        peers_dead=counts["dead"], last_loss=ctx.last_loss, bytes_sent=ctx.metrics.total_sent,
        bytes_received=ctx.metrics.total_received, uptime_s=time.monotonic() - ctx.started_at,
        version=__version__, rounds_target=ctx.cfg.train.rounds, rejected=ctx.metrics.total_rejected,
        cert_expires_in_s=expires, mode=learner.mode, ceiling=negotiator.ceiling,
        quorum_level=negotiator.quorum_level, trained_level=learner.level, negotiation=negotiator.last_decision)


def peers_of(ctx: NodeContext) -> opb.PeersReply:
    now = ctx.membership.clock()
    states = ctx.membership.states()
    return opb.PeersReply(peers=[
        opb.PeerInfo(node_id=m.node_id, address=m.address, state=states[m.node_id].value, heartbeat=m.heartbeat,
                     last_round=m.last_round, last_seen_s=now - m.changed_at, incarnation=m.body.incarnation)
        for m in sorted(ctx.membership.members.values(), key=lambda m: m.node_id)])


class OperatorServicer(operator_pb2_grpc.OperatorServicer):
    def __init__(self, ctx: NodeContext, learner: Learner, negotiator: Negotiator, drain: Callable[[], None]):
        self.ctx, self.learner, self.negotiator = ctx, learner, negotiator
        self.drain = drain

    async def Status(self, request, context):  # noqa: N802
        return status_of(self.ctx, self.learner, self.negotiator)

    async def Peers(self, request, context):  # noqa: N802
        return peers_of(self.ctx)

    async def Drain(self, request, context):  # noqa: N802
        self.drain()
        return opb.DrainReply(accepted=True)


async def start_operator_server(ctx: NodeContext, learner: Learner, negotiator: Negotiator, socket_path: Path,
                                drain: Callable[[], None]) -> grpc.aio.Server:
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    if len(str(socket_path)) > 100:
        raise NetworkError(f"operator socket path {socket_path} is longer than unix sockets allow (~100 chars): "
                           f"set [node] operator_socket to a shorter path")
    if socket_path.exists():
        socket_path.unlink()  # a stale socket from a crash; a live daemon would hold the data-dir lock
    server = grpc.aio.server()
    operator_pb2_grpc.add_OperatorServicer_to_server(OperatorServicer(ctx, learner, negotiator, drain), server)
    old_umask = os.umask(0o177)
    try:
        if server.add_insecure_port(f"unix:{socket_path}") == 0:
            raise NetworkError(f"cannot bind operator socket {socket_path}: check the directory's permissions")
    finally:
        os.umask(old_umask)
    await server.start()
    return server
