"""Many full nodes in one process over the in-memory transport twin (50+ node meshes).

The nodes run the real daemon code (gossip, negotiation, rounds, envelopes, journal, checkpoints);
only the network is the twin (fednode/transport/memory.py), which serializes every message and
models cut links and latency. Used for the cost-scaling figures and for tests of mesh-wide
behaviour that would need too many processes on a small machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fednode.config import Config, parse_config, to_toml
from fednode.learning.data import stdlib_partitions, write_partition
from fednode.node.context import NodeContext
from fednode.node.daemon import Daemon
from fednode.security.ca import init_ca, issue_node
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from tools.harness.collect import read_rounds


def sim_configs(root: Path, n: int, *, overrides: dict[str, dict[str, Any]] | None = None,
                per_node: dict[str, dict[str, dict[str, Any]]] | None = None, seeds: int = 2,
                code_bytes: int = 20_000) -> list[Config]:
    """A CA, certificates, non-IID code partitions and configs for `n` in-memory nodes
    (micro preset, small data: the defaults keep a 50-node mesh within a laptop's reach)."""
    root = Path(root)
    pki = root / "pki"
    init_ca(pki, force=True)
    parts = stdlib_partitions(n)
    width = len(str(n - 1))  # n0..n3, n00..n11, n00..n49
    configs = []
    for i in range(n):
        name = f"n{i:0{width}d}"
        issue_node(pki, name, ["127.0.0.1"])
        home = root / name
        if not (home / "code").exists():
            write_partition(parts[i], home / "code", max_bytes=code_bytes)
        raw: dict[str, dict[str, Any]] = {
            "node": {"name": name, "data_dir": str(home / "state"), "listen": f"mem:{7000 + i}"},
            "mesh": {"seeds": [f"mem:{7000 + s}" for s in range(min(seeds, n)) if s != i] or [f"mem:{7000}"],
                     "gossip_interval_s": 0.3, "suspect_after_s": 6.0, "dead_after_s": 15.0},
            "tls": {"ca": str(pki / "ca.crt"), "cert": str(pki / f"{name}.crt"), "key": str(pki / f"{name}.key")},
            "model": {"preset": "micro", "tokenizer_cache": str(root / "tok")},
            "data": {"dir": str(home / "code"), "seq_len": 32, "max_tokens": 3_000},
            "train": {"steps_per_round": 1, "batch_size": 2, "round_timeout_s": 5.0, "threads": 1},
        }
        for source in (overrides or {}, (per_node or {}).get(name, {})):
            for section, values in source.items():
                raw.setdefault(section, {}).update(values)
        configs.append(parse_config(tomllib.loads(to_toml(raw)), root))
    return configs


class SimHarness:
    """Run `configs` as full daemons on one event loop. Use inside `async with`."""

    def __init__(self, configs: list[Config], network: MemoryNetwork | None = None,
                 progress: Callable[[str], None] | None = None):
        self.configs = {cfg.node.name: cfg for cfg in configs}
        self.network = network or MemoryNetwork()
        self.daemons: dict[str, Daemon] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.progress = progress or (lambda _msg: None)

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    async def __aenter__(self) -> SimHarness:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _factory(self, identity):
        return MemoryTransport(self.network, identity.node_id)

    def start(self, names: Iterable[str] | None = None) -> None:
        for name in names or self.names:
            daemon = Daemon(self.configs[name], self._factory)
            self.daemons[name] = daemon
            self.tasks[name] = asyncio.create_task(daemon.serve(), name=f"node {name}")

    def ctx(self, name: str) -> NodeContext | None:
        daemon = self.daemons.get(name)
        return daemon.ctx if daemon is not None else None

    def live(self) -> list[str]:
        return [n for n, t in self.tasks.items() if not t.done()]

    async def kill(self, name: str) -> None:
        """Stop a node abruptly: its task is cancelled mid-whatever (the daemon still closes its
        files, which a real kill -9 would not do: use ProcessHarness for crash semantics)."""
        task = self.tasks[name]
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    def restart(self, name: str) -> None:
        if not self.tasks[name].done():
            raise RuntimeError(f"{name} is still running: kill it before restarting")
        self.start([name])

    def partition(self, *groups: Iterable[str]) -> None:
        addresses = [[self.configs[n].advertise for n in g] for g in groups]
        for i, a in enumerate(addresses):
            for b in addresses[i + 1:]:
                self.network.partition(a, b)

    def heal(self) -> None:
        self.network.heal()

    def set_latency(self, ms: float, names: Iterable[str] | None = None) -> None:
        for name in names or self.names:
            self.network.latency_s[self.configs[name].advertise] = ms / 1000

    async def wait_until(self, what: str, predicate: Callable[[], bool], timeout: float,
                         detail: Callable[[], str] | None = None) -> None:
        """Poll predicate; on timeout the error says what each node saw (`detail`), not just that it timed out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            for name, task in self.tasks.items():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    raise RuntimeError(f"{name} failed while waiting for {what}: {task.exception()!r}")
            if loop.time() > deadline:
                seen = f": {detail()}" if detail is not None else ""
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{seen}")
            await asyncio.sleep(0.05)

    async def wait_started(self, timeout: float = 300.0) -> None:
        await self.wait_until("start-up", lambda: all(self.ctx(n) is not None for n in self.live()), timeout)

    def membership_views(self) -> str:
        """Each live node's view of the mesh, e.g. 'n0 sees n1; n1 sees nobody; n2 not started'."""
        views = []
        for n in self.live():
            c = self.ctx(n)
            if c is None:
                views.append(f"{n} not started")
                continue
            alive = sorted(m.node_id for m in c.membership.alive())
            views.append(f"{n} sees {', '.join(alive) or 'nobody'}")
        return "; ".join(views)

    async def wait_members(self, timeout: float = 120.0) -> None:
        live = self.live()
        await self.wait_until("membership", lambda: all(
            (c := self.ctx(n)) is not None and len(c.membership.alive()) >= len(live) - 1 for n in live), timeout,
            detail=self.membership_views)

    async def wait_round(self, round_: int, timeout: float) -> None:
        self.progress(f"waiting for round {round_} on {len(self.live())} nodes")
        await self.wait_until(f"round {round_}", lambda: all(
            (c := self.ctx(n)) is not None and c.committed_round >= round_ for n in self.live()), timeout,
            detail=lambda: ", ".join(f"{n} at round {c.committed_round if (c := self.ctx(n)) else '-'}"
                                     for n in self.live()))

    def rounds(self, name: str):
        return read_rounds(self.configs[name].node.data_dir)

    async def close(self, timeout: float = 30.0) -> None:
        """Drain every node (they finish the round they are in), then cancel what is left."""
        for daemon in self.daemons.values():
            daemon.request_drain()
        pending = [t for t in self.tasks.values() if not t.done()]
        if pending:
            _done, late = await asyncio.wait(pending, timeout=timeout)
            for task in late:
                task.cancel()
        for task in self.tasks.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
