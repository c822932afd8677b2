"""Each node's messenger bytes per round must not grow with the mesh size.

Full daemons (the real node code) over the in-memory transport twin, in one process: a 4-node and
a 12-node mesh, static mode at one fixed level, micro preset, tiny data. Each node pushes to a
fixed number of peers per round (the exponential graph, `[mesh] fanout`), so what one node sends
per round is the same whether the mesh has 4 peers or 12. Measured on the journal's `bytes_sent`
over three steady-state rounds (after the whole mesh is live), mean over nodes and rounds.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from pathlib import Path

from fednode.config import parse_config, to_toml
from fednode.learning import messenger
from fednode.learning.data import stdlib_partitions, write_partition
from fednode.node.daemon import Daemon
from fednode.security.pki import init_ca, issue_node
from fednode.store.journal import Journal
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from fednode.transport.tensorstream import encode

LEVEL = 0  # the static level every node trains and sends
ROUNDS = 3  # measured rounds per node, after the whole mesh is live
FANOUT = 2


def make_configs(root: Path, n: int, round_timeout_s: float) -> list:
    pki = root / "pki"
    init_ca(pki)
    parts = stdlib_partitions(n)
    configs = []
    for i in range(n):
        name = f"n{i:02d}"
        issue_node(pki, name, ["127.0.0.1"])
        home = root / name
        write_partition(parts[i], home / "code", max_bytes=20_000)
        raw = {
            "node": {"name": name, "data_dir": str(home / "state"), "listen": f"mem:{7000 + i}"},
            "mesh": {"seeds": ["mem:7000", "mem:7001"], "gossip_interval_s": 0.3, "suspect_after_s": 6.0,
                     "dead_after_s": 15.0, "fanout": FANOUT},
            "tls": {"ca": str(pki / "ca.crt"), "cert": str(pki / f"{name}.crt"), "key": str(pki / f"{name}.key")},
            "model": {"preset": "micro", "tokenizer_cache": str(root / "tok")},
            "data": {"dir": str(home / "code"), "seq_len": 32, "max_tokens": 3_000},
            "train": {"steps_per_round": 1, "batch_size": 2, "round_timeout_s": round_timeout_s, "threads": 1,
                      "catchup_lag": 1000},  # no state fetches: only pushes are measured
            "learning": {"mode": "static", "static_level": LEVEL, "curriculum": False},
        }
        configs.append(parse_config(tomllib.loads(to_toml(raw)), root))
    return configs


async def wait_for(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def run_mesh(root: Path, n: int, round_timeout_s: float) -> tuple[list[list], float]:
    """Start n full nodes, wait until all see each other, then ROUNDS more rounds each.
    Returns each node's journal rows of the measured rounds and the wall time."""
    configs = make_configs(root, n, round_timeout_s)
    network = MemoryNetwork()
    marks: dict[str, int] = {}
    started = time.monotonic()

    async def main() -> None:
        daemons = [Daemon(cfg, lambda ident: MemoryTransport(network, ident.node_id)) for cfg in configs]
        tasks = [asyncio.create_task(d.serve()) for d in daemons]
        try:
            await wait_for(lambda: all(d.ctx is not None and d.ctx.learner is not None for d in daemons), 120,
                           "start-up")
            ctxs = [d.ctx for d in daemons]
            await wait_for(lambda: all(len(c.membership.alive()) == n - 1 for c in ctxs), 60, "full membership")
            # a round that starts from now on sees the whole mesh (its push targets come from the live set)
            marks.update({c.node_id: c.committed_round + 1 for c in ctxs})
            await wait_for(lambda: all(c.committed_round >= marks[c.node_id] + ROUNDS for c in ctxs), 120,
                           f"{ROUNDS} rounds on {n} nodes")
        finally:
            for d in daemons:
                d.request_drain()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r

    asyncio.run(main())
    elapsed = time.monotonic() - started
    rows = []
    for cfg in configs:
        journal = Journal.open(cfg.node.data_dir / "journal.db")
        try:
            first = marks[cfg.node.name] + 1
            rows.append([r for r in journal.rounds() if first <= r.round < first + ROUNDS])
        finally:
            journal.close()
    return rows, elapsed


def test_messenger_bytes_per_node_per_round_do_not_grow_with_mesh_size(tmp_path, caplog):
    ladder = messenger.LADDERS["micro"]
    per_push = encode({k: _zeros(s) for k, s in messenger.level_shapes(ladder, LEVEL).items()},
                      {"round": "1", "sender": "n00"}).total_size  # one level-LEVEL messenger on the wire
    means = {}
    timings = {}
    failures = {}
    for n, timeout in ((4, 10.0), (12, 20.0)):
        caplog.clear()
        rows, timings[n] = run_mesh(tmp_path / f"mesh{n}", n, timeout)
        failures[n] = [r.getMessage() for r in caplog.records if "push failed" in r.getMessage()]
        for node_rows in rows:
            assert len(node_rows) == ROUNDS, node_rows
            assert all(r.level == LEVEL and r.source == "local" for r in node_rows), node_rows
            # whatever was sent is whole level-LEVEL messengers (within the round number's digits)
            for r in node_rows:
                pushes = round(r.bytes_sent / per_push)
                assert 0 <= pushes <= FANOUT and abs(r.bytes_sent - pushes * per_push) <= 16 * pushes, r
        sent = [r.bytes_sent for node_rows in rows for r in node_rows]
        means[n] = sum(sent) / len(sent)
        assert means[n] > 0
    ratio = means[12] / means[4]
    print(f"bytes/node/round: N=4 {means[4]:.0f}, N=12 {means[12]:.0f}, ratio {ratio:.3f}; "
          f"wall: N=4 {timings[4]:.1f}s, N=12 {timings[12]:.1f}s; failed pushes: "
          f"N=4 {len(failures[4])}, N=12 {len(failures[12])}")
    assert 1 / 1.1 <= ratio <= 1.1, (means, timings, failures)


def _zeros(shape):
    import torch

    return torch.zeros(shape, dtype=torch.float32)
