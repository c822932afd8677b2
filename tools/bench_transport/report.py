"""The result: medians over the repeats, the one JSON object, the targets and the human summary."""

from __future__ import annotations

import datetime as dt
import statistics
from typing import Any

from tools.bench_transport.common import MIB, Options
from tools.bench_transport.resources import load_average
from tools.bench_transport.sender import Results


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _other_share(results: Results) -> float | None:
    """CPU seconds other processes took during the timed transfers, per second of transfer: ~0 on a
    quiet machine; above ~0.1 the figures are contended (the machine has few cores)."""
    runs = results.mtls + results.raw
    if not runs or any(t.other_cpu_s is None for t in runs):
        return None
    return round(sum(t.other_cpu_s or 0.0 for t in runs) / sum(t.seconds for t in runs), 3)


def build_result(opts: Options, results: Results, machine: dict[str, Any]) -> dict[str, Any]:
    mtls = _median([t.mbps for t in results.mtls])
    raw = _median([t.mbps for t in results.raw])
    over = max((t.receiver["rss_peak"] - t.receiver["rss_before"]) / t.bytes for t in results.mtls)
    peak = max(t.receiver["rss_peak"] for t in results.mtls)
    raw_over = max(((t.receiver["rss_peak"] - t.receiver["rss_before"]) / t.bytes for t in results.raw),
                   default=None)
    return {
        "bench": "transport",
        "size_mib": opts.size_mib,
        "payload_bytes": results.payload_bytes,
        "repeats": opts.repeats,
        "mtls_e2e_MBps": mtls,
        "raw_MBps": raw,
        "ratio": round(mtls / raw, 4) if mtls and raw else None,
        "peak_rss_over_payload": round(over, 4),
        "receiver_peak_rss_mib": round(peak / MIB, 1),
        "raw_receiver_peak_rss_over_payload": round(raw_over, 4) if raw_over is not None else None,
        "chunk_kib": opts.chunk_kib,
        "validate": opts.validate,
        "units": "MB/s with MB = 1e6 bytes of payload; median over repeats; peak_rss_over_payload = max over "
                 "mTLS repeats of (receiver peak RSS during the transfer - RSS just before) / payload bytes",
        "targets": {"ratio_min": 0.5, "peak_rss_over_payload_max": 1.5},
        "runs": [t.summary() for pair in zip(results.mtls, results.raw or [None] * len(results.mtls), strict=True)
                 for t in pair if t is not None],
        "machine": machine,
        "other_cpu_share": _other_share(results),
        "loadavg_before": results.loadavg_before,
        "loadavg_after": load_average(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": opts.command,
    }


def targets_met(result: dict[str, Any]) -> bool:
    ratio_ok = result["ratio"] is None or result["ratio"] >= result["targets"]["ratio_min"]
    return ratio_ok and result["peak_rss_over_payload"] < result["targets"]["peak_rss_over_payload_max"]


def human_summary(result: dict[str, Any]) -> str:
    size = result["payload_bytes"] / MIB
    lines = [f"transport benchmark: {size:.0f} MiB payload, {result['repeats']} repeat(s), "
             f"{result['chunk_kib']} KiB chunks (MB = 1e6 bytes, medians)",
             f"  mTLS + envelopes, end to end : {result['mtls_e2e_MBps']} MB/s"]
    if result["raw_MBps"] is not None:
        lines.append(f"  raw grpc.aio, no TLS         : {result['raw_MBps']} MB/s")
        lines.append(f"  ratio                        : {result['ratio']} (target >= 0.5)")
    lines.append(f"  receiver peak RSS / payload  : {result['peak_rss_over_payload']} (target < 1.5); "
                 f"absolute peak {result['receiver_peak_rss_mib']} MiB")
    lines.append(f"  receiver validation          : {result['validate']}; other processes' CPU during transfers: "
                 f"{result['other_cpu_share']} cores; load average before/after: {result['loadavg_before']} / "
                 f"{result['loadavg_after']} on {result['machine']['cores']} cores")
    return "\n".join(lines)
