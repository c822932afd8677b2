"""`fednode-bench soak`: a long harness run that must stay flat (issue 6, part 5).

N real daemons (micro preset, short rounds) run R rounds; every node's RSS and open file
descriptors are sampled as its rounds commit. Pass: RSS growth (median over 10 rounds from the
warm-up round, against the median over the last 10) under 10% on every node, open fds flat, no
round lost on any node (a lagging node may skip rounds by adopting a peer's state: counted apart),
every node at the last round, and no process left after the harness stops.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import click
import psutil

from tools import report

SOAK_OVERRIDES = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 32, "max_tokens": 4_000},
    "train": {"steps_per_round": 1, "batch_size": 2, "round_timeout_s": 8.0, "keep_checkpoints": 3},
    "mesh": {"gossip_interval_s": 1.0, "suspect_after_s": 10.0, "dead_after_s": 30.0},
    "learning": {"mode": "static", "static_level": 0},
}


WINDOW = 10  # rounds: RSS is the median over a window, since one sample swings with GC and allocator arenas


def window_median(samples: list[tuple[int, object]], first: int, last: int, key) -> float:
    """Median of key(sample) over the samples taken at rounds first..last (samples: (round, sample),
    ascending); the nearest sample when the window holds none."""
    values = [key(s) for r, s in samples if first <= r <= last]
    if not values:
        values = [key(min(samples, key=lambda rs: abs(rs[0] - first))[1])]
    return statistics.median(values)


def growth(first: float, last: float) -> float:
    return (last - first) / first if first else 0.0


def round_gaps(records: list[tuple[int, str]], rounds: int) -> tuple[list[int], list[int]]:
    """(lost, caught_up) among rounds 1..rounds for one node's journal [(round, source)]: a round
    not in the journal is caught up when a later round was adopted from a peer (FetchState: the
    node skipped ahead to the mesh's state, by design, when it lagged), and lost otherwise."""
    have = {r for r, _ in records}
    fetched = [r for r, source in records if source.startswith("fetched")]
    missing = [r for r in range(1, rounds + 1) if r not in have]
    caught_up = [r for r in missing if any(f > r for f in fetched)]
    return [r for r in missing if r not in caught_up], caught_up


@click.command()
@click.option("--nodes", type=click.IntRange(min=2), default=12, show_default=True)
@click.option("--rounds", type=click.IntRange(min=2), default=100, show_default=True)
@click.option("--warmup", type=click.IntRange(min=1), default=20, show_default=True,
              help="RSS and fds are compared from this round to the last.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/soak"), show_default=True)
@click.option("--check", is_flag=True, help="Exit 1 unless every target holds (RSS growth < 10%, fds flat, "
                                            "no round lost, every node at the last round, no process left).")
def soak(nodes: int, rounds: int, warmup: int, out: Path, check: bool) -> None:
    """Run a mesh of real daemons for many rounds and check that memory and file descriptors stay
    flat, every round commits on every node, and nothing is left running afterwards."""
    from tools.harness import ProcessHarness

    if warmup >= rounds:
        raise click.UsageError(f"--warmup {warmup} must be below --rounds {rounds}")
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} is a file: give a directory")
    meta = report.run_metadata(report.command_line(), preset="micro", nodes=nodes, rounds=rounds, warmup=warmup)
    overrides = {**SOAK_OVERRIDES, "train": {**SOAK_OVERRIDES["train"], "rounds": rounds}}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fednode-soak-") as tmp:
        with ProcessHarness(Path(tmp), nodes, overrides=overrides, code_bytes=20_000) as h:
            h.start()
            h.wait_members(timeout=600)
            pids = {name: h.pid(name) for name in h.names}
            for r in range(1, rounds + 1):
                h.wait_round(r, timeout=300)
                if r % 10 == 0 or r == rounds:
                    rss = statistics.fmean(h.samples[n][-1][1].rss_bytes for n in h.names) / 2**20
                    click.echo(f"[{(time.monotonic() - started) / 60:.1f} min] round {r}/{rounds}, "
                               f"mean RSS {rss:.0f} MiB", err=True)
            h.close()
            leaked = [name for name, pid in pids.items() if _running(pid)]
            journals = {name: [(rec.round, rec.source) for rec in h.rounds(name)] for name in h.names}
            samples = dict(h.samples)
    per_node = {}
    for name, trail in samples.items():
        end = trail[-1][0]
        rss_warm = window_median(trail, warmup, warmup + WINDOW - 1, lambda s: s.rss_bytes)
        rss_end = window_median(trail, end - WINDOW + 1, end, lambda s: s.rss_bytes)
        fds_warm = round(window_median(trail, warmup, warmup + WINDOW - 1, lambda s: s.open_fds))
        last = trail[-1][1]
        lost, caught_up = round_gaps(journals[name], rounds)
        per_node[name] = {"rss_warmup_mib": rss_warm / 2**20, "rss_end_mib": rss_end / 2**20,
                          "rss_growth": growth(rss_warm, rss_end), "fds_warmup": fds_warm,
                          "fds_end": last.open_fds, "threads_end": last.threads,
                          "lost_rounds": lost, "caught_up_rounds": caught_up,
                          "last_round": max((r for r, _ in journals[name]), default=0)}
    summary = {
        "rss_growth_max": max(v["rss_growth"] for v in per_node.values()),
        "fd_growth_max": max(v["fds_end"] - v["fds_warmup"] for v in per_node.values()),
        "rounds_lost": sum(len(v["lost_rounds"]) for v in per_node.values()),
        "rounds_caught_up": sum(len(v["caught_up_rounds"]) for v in per_node.values()),
        "nodes_short_of_last_round": sum(v["last_round"] < rounds for v in per_node.values()),
        "leaked_processes": len(leaked), "minutes": (time.monotonic() - started) / 60,
    }
    passed = (summary["rss_growth_max"] < 0.10 and summary["fd_growth_max"] <= 2 and not summary["rounds_lost"]
              and not summary["nodes_short_of_last_round"] and not leaked)
    summary["passed"] = passed
    rows = [[n, f"{v['rss_warmup_mib']:.0f}", f"{v['rss_end_mib']:.0f}", f"{v['rss_growth']:+.1%}", v["fds_warmup"],
             v["fds_end"], v["last_round"], len(v["lost_rounds"]), len(v["caught_up_rounds"])]
            for n, v in per_node.items()]
    text = "\n".join([
        f"# Soak: {nodes} daemons x {rounds} rounds", "", f"Command: `{meta['command']}`  ",
        f"Date: {meta['date_utc']}  ", "",
        report.markdown_table(["node", f"RSS MiB (median, rounds {warmup}-{warmup + WINDOW - 1})",
                               f"RSS MiB (median, last {WINDOW} rounds)", "growth",
                               f"fds @ {warmup}", f"fds @ {rounds}", "last round", "rounds lost",
                               "rounds caught up (FetchState)"], rows), "",
        f"Max RSS growth {summary['rss_growth_max']:+.1%} (target < 10%), max fd growth {summary['fd_growth_max']}, "
        f"rounds lost {summary['rounds_lost']}, rounds skipped by catching up {summary['rounds_caught_up']}, "
        f"nodes short of round {rounds}: {summary['nodes_short_of_last_round']}, processes left {len(leaked)}: "
        f"{'PASS' if passed else 'FAIL'} in {summary['minutes']:.1f} min", ""])
    report.write_report(out, "soak", {"metadata": meta, "summary": summary, "per_node": per_node,
                                      "samples": {n: [(r, s.__dict__) for r, s in t] for n, t in samples.items()}},
                        text)
    report.line_plot(out / "soak_rss.png", {n: ([r for r, _ in t], [s.rss_bytes / 2**20 for _, s in t])
                                            for n, t in samples.items()}, "round", "RSS (MiB)",
                     f"RSS per daemon over {rounds} rounds")
    click.echo(text)
    report.emit_last_line({"benchmark": "soak", **summary})
    if check and not passed:
        sys.exit(1)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
