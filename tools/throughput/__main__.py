"""`python -m tools.throughput ...` runs the benchmark without fednode-bench."""

from tools.throughput.cli import throughput

throughput(prog_name="python -m tools.throughput")
