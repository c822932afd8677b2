"""`fednode-bench scaling`: messenger bytes each node sends per round, as the mesh grows.

Full daemons (the real node code) over the in-memory transport twin in one process (SimHarness),
static mode at one level, micro preset. Each node pushes to `[mesh] fanout` peers per round (the
exponential graph), so what a node sends per round must not grow with the mesh: the report gives
the mean over nodes and steady-state rounds for each size, and the ratio largest / smallest.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import click

from tools import report

LEVEL = 0
FANOUT = 2


@dataclass
class MeshBytes:
    nodes: int
    rounds: list[list]  # per node: the journal records of the measured rounds
    wall_s: float

    @property
    def mean_bytes(self) -> float:
        sent = [r.bytes_sent for node in self.rounds for r in node]
        return statistics.fmean(sent) if sent else 0.0


def measure(root: Path, n: int, rounds: int, round_timeout_s: float, progress=lambda _m: None) -> MeshBytes:
    """Start n in-process nodes, wait for full membership, then `rounds` more rounds on every node;
    their journal records (each node's rounds that started with the whole mesh live)."""
    from tools.harness.sim import SimHarness, sim_configs

    overrides = {"mesh": {"fanout": FANOUT, "suspect_after_s": 6.0 + n / 5, "dead_after_s": 15.0 + n / 2},
                 "train": {"round_timeout_s": round_timeout_s, "catchup_lag": 1000},  # only pushes measured
                 "learning": {"mode": "static", "static_level": LEVEL, "curriculum": False}}
    configs = sim_configs(root, n, overrides=overrides)
    marks: dict[str, int] = {}
    started = time.monotonic()

    async def main() -> None:
        async with SimHarness(configs, progress=progress) as sim:
            sim.start()
            await sim.wait_started(timeout=120 + 5 * n)
            await sim.wait_members(timeout=60 + 3 * n)
            # a round that starts from now on sees the whole mesh (its push targets come from the live set)
            marks.update({name: sim.ctx(name).committed_round + 1 for name in sim.names})
            await sim.wait_until(f"{rounds} rounds on {n} nodes", lambda: all(
                sim.ctx(name).committed_round >= marks[name] + rounds for name in sim.names),
                timeout=(rounds + 2) * round_timeout_s * 3)

    asyncio.run(main())
    from tools.harness.collect import read_rounds

    rows = []
    for cfg in configs:
        first = marks[cfg.node.name] + 1
        rows.append([r for r in read_rounds(cfg.node.data_dir) if first <= r.round < first + rounds])
    return MeshBytes(n, rows, time.monotonic() - started)


@click.command()
@click.option("--nodes", "sizes", default="4,12,50", show_default=True, help="Comma-separated mesh sizes.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True,
              help="Measured rounds per node, after the whole mesh is live.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/scaling"), show_default=True)
def scaling(sizes: str, rounds: int, out: Path) -> None:
    """Messenger bytes per node per round for growing meshes of in-process nodes (the transport
    twin): flat when the exponential push graph works."""
    import tempfile

    try:
        ns = sorted({int(x) for x in sizes.split(",") if x.strip()})
    except ValueError:
        raise click.UsageError(f"--nodes must be comma-separated integers, got {sizes!r}") from None
    if not ns or ns[0] < 2:
        raise click.UsageError("--nodes needs sizes of at least 2")
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} is a file: give a directory")
    meta = report.run_metadata(report.command_line(), preset="micro", sizes=ns, rounds=rounds, fanout=FANOUT)
    results = []
    with tempfile.TemporaryDirectory(prefix="fednode-scaling-") as tmp:
        for n in ns:
            click.echo(f"mesh of {n} nodes ...", err=True)
            results.append(measure(Path(tmp) / f"mesh{n}", n, rounds, round_timeout_s=10.0 + n / 2,
                                   progress=lambda m: click.echo(f"  {m}", err=True)))
    base = results[0].mean_bytes
    rows = [[r.nodes, f"{r.mean_bytes:,.0f}", f"{r.mean_bytes / base:.3f}" if base else "-", f"{r.wall_s:.0f}"]
            for r in results]
    ratio = results[-1].mean_bytes / base if base else None
    text = "\n".join([f"# Scaling: messenger bytes per node per round (fanout {FANOUT}, level {LEVEL})", "",
                      f"Command: `{meta['command']}`  ", f"Date: {meta['date_utc']}", "",
                      report.markdown_table(["nodes", "bytes/node/round", "vs smallest", "wall s"], rows), "",
                      f"ratio {ns[-1]} / {ns[0]} nodes: {ratio:.3f}" if ratio else "", ""])
    report.write_report(out, "scaling", {"metadata": meta, "sizes": {r.nodes: {"mean_bytes": r.mean_bytes,
                                                                               "wall_s": r.wall_s} for r in results},
                                          "ratio": ratio}, text)
    report.bar_plot(out / "scaling.png", [str(r.nodes) for r in results], [r.mean_bytes / 2**20 for r in results],
                    "MiB per node per round", "Messenger bytes per node per round vs mesh size")
    click.echo(text)
    report.emit_last_line({"benchmark": "scaling", "bytes_ratio_largest_smallest": ratio,
                           "mean_bytes": {r.nodes: r.mean_bytes for r in results}})
