"""Full nodes (the real daemon code) over the in-memory transport twin, in one process.

The twin must give the same behaviour as gRPC: the mesh forms, rounds merge peer updates, a
partition never blocks a round past its deadline, and the halves re-merge when it heals.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fednode.node.daemon import Daemon
from fednode.store.journal import Journal
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from tools.harness.sim import sim_configs

N = 4


def make_configs(root: Path, extra: dict | None = None, per_node: dict | None = None) -> list:
    base = {"mesh": {"gossip_interval_s": 0.2, "suspect_after_s": 1.5, "dead_after_s": 4.0},
            "data": {"max_tokens": 5_000}, "train": {"round_timeout_s": 3.0}}
    for section, values in (extra or {}).items():
        base[section] = {**base.get(section, {}), **values}
    return sim_configs(root, N, overrides=base, per_node=per_node, seeds=1, code_bytes=40_000)


async def wait_for(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def test_full_nodes_over_the_memory_twin_form_a_mesh_survive_a_partition_and_heal(tmp_path):
    configs = make_configs(tmp_path)
    network = MemoryNetwork()

    async def main() -> dict[str, int]:
        daemons = [Daemon(cfg, lambda ident: MemoryTransport(network, ident.node_id)) for cfg in configs]
        tasks = [asyncio.create_task(d.serve()) for d in daemons]
        try:
            await wait_for(lambda: all(d.ctx is not None for d in daemons), 120, "start-up")
            ctxs = [d.ctx for d in daemons]
            await wait_for(lambda: all(len(c.membership.alive()) == N - 1 for c in ctxs), 30, "membership")
            await wait_for(lambda: all(c.committed_round >= 2 for c in ctxs), 60, "two rounds")

            addresses = [c.own_body.address for c in ctxs]
            network.partition(addresses[:2], addresses[2:])
            marks = [c.committed_round for c in ctxs]
            await wait_for(lambda: all(c.committed_round >= m + 3 for c, m in zip(ctxs, marks, strict=True)), 60,
                           "rounds during the partition")
            assert all(len(c.membership.alive()) == 1 for c in ctxs), "each half sees only its own side"

            network.heal()
            await wait_for(lambda: all(len(c.membership.alive()) == N - 1 for c in ctxs), 30, "heal")
            marks = [c.committed_round for c in ctxs]
            await wait_for(lambda: all(c.committed_round >= m + 2 for c, m in zip(ctxs, marks, strict=True)), 60,
                           "rounds after healing")
            return {c.node_id: c.metrics.total_rejected for c in ctxs}
        finally:
            for d in daemons:
                d.request_drain()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r

    asyncio.run(main())
    for cfg in configs:
        journal = Journal.open(cfg.node.data_dir / "journal.db")
        rounds = journal.rounds()
        journal.close()
        numbers = [r.round for r in rounds]
        assert numbers == sorted(set(numbers))
        for prev, rec in zip(rounds, rounds[1:], strict=False):  # a gap only where the node caught up
            assert rec.round == prev.round + 1 or rec.source.startswith("fetched:"), (prev, rec)
        merged_peers = set().union(*(set(r.merged_from) for r in rounds))
        assert merged_peers, f"{cfg.node.name} never merged anything"
    assert network.bytes_moved > 0


def test_adaptive_mesh_negotiates_growth_and_a_low_ceiling_peer_keeps_its_slice(tmp_path):
    # easy growth conditions: any loss history counts as a plateau, any divergence is enough
    extra = {"negotiation": {"plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0,
                             "min_round_gap": 0, "activation_delay": 3, "min_live_peers": 3},
             "train": {"round_timeout_s": 4.0}}
    configs = make_configs(tmp_path, extra, per_node={"n3": {"budget": {"max_level": 0}}})
    network = MemoryNetwork()
    sent_levels: dict[str, set[int]] = {}

    async def main():
        daemons = [Daemon(cfg, lambda ident: MemoryTransport(network, ident.node_id)) for cfg in configs]
        tasks = [asyncio.create_task(d.serve()) for d in daemons]
        try:
            await wait_for(lambda: all(d.serving for d in daemons), 120, "start")
            high = [d for d in daemons if d.ctx.node_id != "n3"]
            await wait_for(lambda: all(d.learner.level >= 1 for d in high), 150, "a negotiated growth")
            await wait_for(lambda: len({d.negotiator.committed for d in daemons}) == 1, 30, "one agreement everywhere")
            low = next(d for d in daemons if d.ctx.node_id == "n3")
            assert low.learner.level == 0 and low.negotiator.ceiling == 0  # trains its own prefix ...
            mark = low.ctx.committed_round
            await wait_for(lambda: low.ctx.committed_round >= mark + 2, 60, "the low peer keeps committing")
            for d in daemons:  # every update that travelled was an exact ladder slice of the messenger
                for r in d.ctx.journal.rounds():
                    sent_levels.setdefault(d.ctx.node_id, set()).add(r.level)
            return [(d.ctx.node_id, d.negotiator.committed, d.learner.level) for d in daemons]
        finally:
            for d in daemons:
                d.request_drain()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r

    result = asyncio.run(main())
    agreement = result[0][1]
    assert agreement.epoch >= 1 and agreement.level >= 1
    assert sent_levels["n3"] == {0}
    assert max(sent_levels["n0"]) >= 1
    # the ... and is never excluded: higher-level peers merged its level-0 updates after the growth
    merged_low = []
    for cfg in configs[:3]:
        journal = Journal.open(cfg.node.data_dir / "journal.db")
        merged_low += [r.round for r in journal.rounds() if "n3" in r.merged_from and r.level >= 1]
        journal.close()
    assert merged_low


def test_a_membership_timeout_names_what_each_node_sees(tmp_path):
    """A mesh that never forms fails with each node's view, not just 'timed out' (issue 14)."""
    import pytest

    from tools.harness.sim import SimHarness

    configs = sim_configs(tmp_path, 2, overrides={"mesh": {"gossip_interval_s": 0.2}, "data": {"max_tokens": 2_000}},
                          seeds=0, code_bytes=10_000)

    async def main() -> None:
        async with SimHarness(configs) as h:
            h.partition([h.names[0]], [h.names[1]])
            h.start()
            await h.wait_started()
            with pytest.raises(TimeoutError, match=f"{h.names[0]} sees nobody; {h.names[1]} sees nobody"):
                await h.wait_members(timeout=1.0)

    asyncio.run(main())
