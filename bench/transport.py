"""Transport benchmark: `python bench/transport.py [args]` is `fednode-bench transport [args]`.

Pushes a messenger (default 256 MiB) between two daemons over mTLS with envelopes and the same
bytes over a raw grpc.aio stream; the last stdout line is one JSON object (see bench/RESULTS.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from tools.bench_cli import transport

    transport.main(args=sys.argv[1:], prog_name="bench/transport.py")
