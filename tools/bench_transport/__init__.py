"""Transport benchmark: a messenger pushed between two daemons over mTLS with envelopes, against
the same bytes over a raw grpc.aio stream (no TLS, no envelopes), in the same run.

The mTLS receiver is a separate process serving the real `PeerService` over a real
`NodeContext` (journal, payload key, membership, inbox, validation); the sender handshakes
with it like a peer would and calls `fednode.node.exchange.push_update`, timed from the start
of the push to the receipt. The raw receiver is another process whose generic stream-unary
handler copies 1 MiB chunks into one preallocated buffer (comparable memory work). Both
receivers measure their RSS just before each transfer and its peak during it (a sampler thread
plus, on Linux, the kernel's exact high-water mark reset through /proc/self/clear_refs).

Throughput is payload bytes / seconds in MB/s with MB = 1e6 bytes; each side's figure is the
median over the repeats, which alternate mTLS and raw so drift hits both alike.

Modules, one job each (none imports this package's `__init__`):

- `common`: constants, `Options`, `progress()`;
- `resources`: RSS and its peak (`PeakRss`), CPU seconds, machine busy time, load average, machine info;
- `payload`: the random tensors and the receivers' validations;
- `receiver`: the receiver child processes (mTLS `PeerService`, raw grpc.aio) and `ReceiverProcess`;
- `sender`: the handshake and the timed pushes on both paths (`Transfer`, `Results`);
- `report`: medians, the JSON result, the targets, the human summary;
- `run`: the benchmark end to end and the CLI body (`main`, `command_line`).
"""

from tools.bench_transport.common import Options
from tools.bench_transport.run import command_line, main, run

__all__ = ["Options", "command_line", "main", "run"]
