"""The benchmark end to end: certificates, receivers, payload, sender, result; and the CLI body."""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from tools.bench_transport.common import (
    MAX_CHUNK_KIB,
    RECEIVER_NAME,
    SENDER_NAME,
    TENSOR_MIB,
    Options,
    progress,
)
from tools.bench_transport.payload import VALIDATORS, make_payload
from tools.bench_transport.receiver import ReceiverProcess, ReceiverSpec, write_profile
from tools.bench_transport.report import build_result, human_summary, targets_met
from tools.bench_transport.resources import load_average, machine_info
from tools.bench_transport.sender import Results, run_sender


def run(opts: Options) -> dict[str, Any]:
    """Run the whole benchmark; every process and directory it makes is gone when it returns or raises."""
    from fednode.security.ca import init_ca, issue_node
    from fednode.security.identity import load_identity

    if opts.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {opts.repeats}")
    if not 1 <= opts.chunk_kib <= MAX_CHUNK_KIB:
        raise ValueError(f"--chunk-kib must be in [1, {MAX_CHUNK_KIB}], got {opts.chunk_kib}")
    if opts.validate not in VALIDATORS:
        raise ValueError(f"--validate must be one of {sorted(VALIDATORS)}, got {opts.validate!r}")
    workdir = Path(tempfile.mkdtemp(prefix="fednode-bench-transport-"))
    receivers: list[ReceiverProcess] = []
    try:
        progress(f"mesh CA and node certificates in {workdir}")
        init_ca(workdir / "ca", name="fednode bench CA")
        loopback = ["127.0.0.1", "localhost"]
        rx_files = issue_node(workdir / "ca", RECEIVER_NAME, loopback)
        tx_files = issue_node(workdir / "ca", SENDER_NAME, loopback)
        identity = load_identity(tx_files.cert_path, tx_files.key_path, tx_files.ca_path)
        if opts.profile_dir is not None:
            opts.profile_dir.mkdir(parents=True, exist_ok=True)

        def profile_path(name: str) -> str:
            return str(opts.profile_dir / f"{name}.txt") if opts.profile_dir is not None else ""

        max_payload_mib = max(8192, opts.size_mib + 64)
        mtls_rx = ReceiverProcess(ReceiverSpec("mtls", str(workdir), str(rx_files.ca_path), str(rx_files.cert_path),
                                               str(rx_files.key_path), max_payload_mib, profile_path("receiver-mtls"),
                                               opts.validate, opts.chunk_kib))
        receivers.append(mtls_rx)
        raw_rx = None
        if not opts.skip_raw:
            raw_rx = ReceiverProcess(ReceiverSpec("raw", str(workdir), max_payload_mib=max_payload_mib,
                                                  profile_path=profile_path("receiver-raw")))
            receivers.append(raw_rx)
        progress(f"building a {opts.size_mib} MiB payload of float32 tensors ({TENSOR_MIB} MiB each)")
        tensors = make_payload(opts.size_mib)
        for rx in receivers:
            rx.wait_ready()
            progress(f"receiver {rx.spec.kind} (pid {rx.pid}) serving at {rx.address}")
        results = Results(loadavg_before=load_average())
        profiler = cProfile.Profile() if opts.profile_dir is not None else None
        if profiler is not None:
            profiler.enable()
        try:
            asyncio.run(run_sender(opts, identity, tensors, mtls_rx, raw_rx, results))
        finally:
            if profiler is not None:
                profiler.disable()
                write_profile(profiler, opts.profile_dir / "sender.txt")  # type: ignore[operator]
        del tensors
        return build_result(opts, results, machine_info())
    finally:
        for rx in receivers:
            rx.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main(opts: Options, *, check: bool = False) -> int:
    """CLI body: progress on stderr, a human summary, then one JSON object as the last stdout line."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)  # run the finally blocks: receivers stopped, temp dir removed

        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result = run(opts)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(human_summary(result), flush=True)
    print(json.dumps(result, separators=(",", ":")), flush=True)
    if check and not targets_met(result):
        progress("targets missed (ratio >= 0.5 and peak RSS / payload < 1.5)")
        return 1
    return 0


def command_line() -> str:
    argv0 = sys.argv[0] if sys.argv else "fednode-bench"
    if argv0.endswith(".py"):
        with contextlib.suppress(ValueError):
            argv0 = os.path.relpath(argv0)
        return shlex.join(["python", argv0, *sys.argv[1:]])
    return shlex.join([os.path.basename(argv0), *sys.argv[1:]])
