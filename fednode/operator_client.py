"""Client of a node's operator socket, shared by the CLI, the demo and the test harness."""

from __future__ import annotations

import math
import time
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict

from fednode.errors import ExitCode, FednodeError
from fednode.v1 import operator_pb2 as opb
from fednode.v1 import operator_pb2_grpc


class NotRunning(FednodeError):
    exit_code = ExitCode.NOT_RUNNING


def _call(socket: Path, method: str, request, timeout: float):
    if not Path(socket).exists():
        raise NotRunning(f"no fednode daemon is running at {socket} (the socket does not exist): start it with "
                         f"`fednode run --config FILE`")
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = operator_pb2_grpc.OperatorStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise NotRunning(f"the daemon at {socket} does not answer ({exc.code().name}): is it running? "
                             f"check `journalctl -u fednode@SITE` or its log") from None


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _as_dict(message) -> dict:
    """The reply as JSON-ready data, 64-bit integers as numbers (protobuf's JSON mapping makes them
    strings, which `status --json | jq '.round + 1'` cannot add to)."""
    out = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _numbers(message.DESCRIPTOR, out)
    return out


def _numbers(descriptor, data: dict) -> None:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.type in _INT64:
                data[field.name] = {k: int(v) for k, v in value.items()}
            elif value_field.message_type is not None:
                for v in value.values():
                    _numbers(value_field.message_type, v)
        elif field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, dict):
                    _numbers(field.message_type, v)


def fetch_status(socket: Path, timeout: float = 5.0) -> dict:
    return _as_dict(_call(socket, "Status", opb.StatusRequest(), timeout))


def fetch_peers(socket: Path, timeout: float = 5.0) -> dict:
    return _as_dict(_call(socket, "Peers", opb.PeersRequest(), timeout))


def request_drain(socket: Path, timeout: float = 5.0) -> bool:
    return bool(_call(socket, "Drain", opb.DrainRequest(), timeout).accepted)


def wait_until(socket: Path, predicate, timeout: float, interval: float = 0.25) -> dict:
    """Poll Status until predicate(status) holds; raises TimeoutError with the last status."""
    deadline = time.monotonic() + timeout
    last: dict | None = None
    while True:
        try:
            last = fetch_status(socket, timeout=2.0)
            if predicate(last):
                return last
        except NotRunning:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not reached within {timeout:.0f}s at {socket}; last status: {last}")
        time.sleep(interval)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def render_status(s: dict) -> str:
    loss = s.get("last_loss", float("nan"))
    missing = loss is None or loss == "NaN" or (isinstance(loss, float) and math.isnan(loss))
    loss_text = "-" if missing else f"{loss:.4f}"
    target = int(s.get("rounds_target", 0))
    rows = [
        ("node", f"{s['node_id']} ({s['address']}) v{s['version']}"),
        ("phase", s["state"]),
        ("round", f"{s['round']}" + (f" / {target}" if target else "")),
        ("mode", s.get("mode", "")),
        ("epoch / level", f"{s['epoch']} / {s['level']} (trains level {s.get('trained_level', 0)}, ceiling "
                          f"{s.get('ceiling', 0)}, quorum affords {s.get('quorum_level', 0)})"),
        ("negotiation", s.get("negotiation", "")),
        ("peers", f"{s['peers_alive']} alive, {s['peers_suspect']} suspect, {s['peers_dead']} dead"),
        ("held-out loss", loss_text),
        ("traffic", f"sent {_fmt_bytes(float(s['bytes_sent']))}, received {_fmt_bytes(float(s['bytes_received']))}"),
        ("refused msgs", str(s["rejected"])),
        ("uptime", f"{float(s['uptime_s']):.0f} s"),
        ("cert expires", f"in {float(s['cert_expires_in_s']) / 86400:.1f} days"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def render_peers(reply: dict) -> str:
    peers = reply.get("peers", [])
    if not peers:
        return "no peers known yet"
    header = ("NODE", "ADDRESS", "STATE", "ROUND", "LAST SEEN")
    rows = [(p["node_id"], p["address"], p["state"], str(p["last_round"]), f"{float(p['last_seen_s']):.1f}s ago")
            for p in peers]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows])
