"""The wire contract: proto/ is the source of truth and the committed code must match it."""

import subprocess
import sys
from pathlib import Path

from fednode.v1 import operator_pb2, peer_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protocol_code_is_up_to_date():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_services_have_the_contracted_methods():
    peer = peer_pb2.DESCRIPTOR.services_by_name["Peer"]
    assert {m.name for m in peer.methods} == {"Handshake", "Gossip", "PushMessenger", "FetchState"}
    push = peer.methods_by_name["PushMessenger"]
    assert push.client_streaming and not push.server_streaming
    fetch = peer.methods_by_name["FetchState"]
    assert fetch.server_streaming and not fetch.client_streaming
    operator = operator_pb2.DESCRIPTOR.services_by_name["Operator"]
    assert {"Status", "Peers", "Drain"} <= {m.name for m in operator.methods}
