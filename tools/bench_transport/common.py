"""The benchmark's constants, its options, and its progress line on stderr."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
MB = 1_000_000
CHUNK_KIB = 1024  # the daemon's default ([limits] chunk_kib)
MAX_CHUNK_KIB = 16 * 1024  # the envelope's limit (fednode.security.envelope.MAX_CHUNK_SIZE)
TENSOR_MIB = 16
RAW_SERVICE = "fednode.bench.Raw"
RAW_METHOD = f"/{RAW_SERVICE}/Push"
TOTAL_BYTES_KEY = "x-bench-total-bytes"
RECEIVER_NAME, SENDER_NAME = "bench-receiver", "bench-sender"
BENCH_TOKENIZER, BENCH_FAMILY = "bench-tokenizer", "bench-family"
ROUND, EPOCH = 1, 0
READY_TIMEOUT_S = 120.0  # a receiver imports torch and grpc, then binds
REPORT_TIMEOUT_S = 60.0
HANDSHAKE_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SAMPLE_INTERVAL_S = 0.005


def progress(message: str) -> None:
    print(f"[bench transport] {message}", file=sys.stderr, flush=True)


@dataclass
class Options:
    size_mib: int = 256
    repeats: int = 3
    skip_raw: bool = False
    timeout_s: float | None = None
    profile_dir: Path | None = None
    validate: str = "learner"
    chunk_kib: int = CHUNK_KIB
    command: str = ""

    @property
    def chunk_size(self) -> int:
        return self.chunk_kib * 1024

    @property
    def push_timeout(self) -> float:
        # generous: assumes at least 2 MiB/s, so only a hung transfer ever hits it
        return self.timeout_s if self.timeout_s is not None else 60.0 + 0.5 * self.size_mib
