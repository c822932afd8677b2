"""Only the messenger's tensors ever leave a node: no private-model tensor is ever sent.

Full daemons (the real node code) over the in-memory transport twin, in one process. Every update
a node accepts is recorded as the receiver decoded it (`receive_update`, after decryption), every
state a node serves over FetchState is recorded as the file it streams (`serve_state`), and each
sender's private model is snapshotted when it pushes. Then: what travelled is exactly the
messenger slice of the announced level, never a `private.*` tensor, and never equal to a tensor of
the sender's private model. A node started late catches up over FetchState: it receives only a
messenger, and its own private model is left alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from fednode.learning import messenger
from fednode.learning.models import state_tensors
from fednode.node import peer_service, rounds
from fednode.node.daemon import Daemon
from fednode.node.learner import MessengerLearner
from fednode.store.checkpoint import load_checkpoint
from fednode.transport.memory import MemoryNetwork, MemoryTransport
from tools.harness.sim import sim_configs

N = 4  # n0..n2 start together, n3 starts late and catches up
LATE = "n3"
LADDER = messenger.LADDERS["micro"]


def make_configs(root: Path) -> list:
    return sim_configs(root, N, code_bytes=40_000, overrides={
        "mesh": {"gossip_interval_s": 0.2, "suspect_after_s": 2.0, "dead_after_s": 5.0},
        "data": {"max_tokens": 5_000},
        "train": {"round_timeout_s": 3.0, "catchup_lag": 2},
        "learning": {"mode": "adaptive"},  # the product mode: the messenger travels at the negotiated level
        # eager growth (as `fednode demo --adaptive`): updates travel at more than one level
        "negotiation": {"plateau_window": 1, "plateau_theta": 10.0, "js_threshold": 0.0, "min_round_gap": 0,
                        "activation_delay": 3, "min_live_peers": 2},
    })


async def wait_for(predicate, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def _equal_pairs(sent: dict[str, torch.Tensor], private: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(sent name, private name) of every sent tensor equal to some private tensor."""
    return [(s, p) for s, t in sent.items() for p, q in private.items()
            if t.shape == q.shape and t.dtype == q.dtype and torch.equal(t, q)]


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """Run the mesh with every update received, every state served and every catch-up recorded."""
    configs = make_configs(tmp_path)
    network = MemoryNetwork()
    daemons: dict[str, Daemon] = {}
    received: list[dict] = []  # one per update a node accepted
    private_at_push: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (sender, round) -> P when it pushed
    served: list[dict] = []  # one per FetchState stream
    adopted: list[dict] = []  # one per catch-up (adopt_shared)

    real_receive = peer_service.receive_update

    async def recording_receive(opener, chunks):
        update = await real_receive(opener, chunks)
        received.append({"receiver": opener.header.recipient_id, "sender": update.sender, "round": update.round,
                         "level": update.level, "tensors": _clone(update.tensors)})
        return update

    real_push = rounds.push_update

    async def recording_push(transport, identity, to, tensors, **kw):
        key = (identity.node_id, kw["round_"])
        if key not in private_at_push:  # the private model as it was when this round's messenger left
            private_at_push[key] = state_tensors(daemons[identity.node_id].learner.private)
        return await real_push(transport, identity, to, tensors, **kw)

    real_serve = peer_service.serve_state

    async def recording_serve(identity, to, path, **kw):
        tensors, meta = load_checkpoint(path)
        full, _ = load_checkpoint(path.with_name(path.name.replace(".shared.safetensors", ".safetensors")))
        served.append({"server": identity.node_id, "to": to.node_id, "round": kw["round_"], "path": path.name,
                       "level": int(meta["level"]), "tensors": tensors, "meta": meta,
                       "private": {k: v for k, v in full.items() if k.startswith("private.")}})
        async for chunk in real_serve(identity, to, path, **kw):
            yield chunk

    real_adopt = MessengerLearner.adopt_shared

    def recording_adopt(self, tensors, level):
        before = state_tensors(self.private)
        real_adopt(self, tensors, level)
        adopted.append({"node": self.cfg.node.name, "level": level, "own_level": self.level,
                        "tensors": _clone(tensors), "private_before": before,
                        "private_after": state_tensors(self.private),
                        "messenger_after": state_tensors(self.messenger)})

    monkeypatch.setattr(peer_service, "receive_update", recording_receive)
    monkeypatch.setattr(rounds, "push_update", recording_push)
    monkeypatch.setattr(peer_service, "serve_state", recording_serve)
    monkeypatch.setattr(MessengerLearner, "adopt_shared", recording_adopt)

    async def main() -> dict[str, dict[str, torch.Tensor]]:
        def start(cfg) -> asyncio.Task:
            daemon = Daemon(cfg, lambda ident: MemoryTransport(network, ident.node_id))
            daemons[cfg.node.name] = daemon
            return asyncio.create_task(daemon.serve())

        tasks = [start(cfg) for cfg in configs if cfg.node.name != LATE]
        try:
            early = list(daemons.values())
            await wait_for(lambda: all(d.serving for d in early), 120, "start-up")
            await wait_for(lambda: all(len(d.ctx.membership.alive()) == N - 2 for d in early), 30, "membership")
            await wait_for(lambda: all(d.ctx.committed_round >= 4 and d.learner.level >= 1 for d in early), 120,
                           "four rounds and a negotiated growth")
            tasks.append(start(next(cfg for cfg in configs if cfg.node.name == LATE)))
            late = daemons[LATE]
            await wait_for(lambda: any(a["node"] == LATE for a in adopted), 90, "the late node to catch up")
            await wait_for(lambda: late.ctx.committed_round >= max(d.ctx.committed_round for d in early) - 1
                           and any(r["sender"] == LATE for r in received), 60, "the late node to push")
            mark = {n: d.ctx.committed_round for n, d in daemons.items()}
            await wait_for(lambda: all(d.ctx.committed_round >= mark[n] + 2 for n, d in daemons.items()), 60,
                           "two more rounds everywhere")
            return {n: state_tensors(d.learner.private) for n, d in daemons.items()}
        finally:
            for d in daemons.values():
                d.request_drain()
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r

    final_private = asyncio.run(main())
    return {"received": received, "private_at_push": private_at_push, "served": served, "adopted": adopted,
            "final_private": final_private, "configs": configs}


def test_only_messenger_tensors_are_ever_sent_and_a_catch_up_keeps_the_private_model(recorded):
    received, private_at_push = recorded["received"], recorded["private_at_push"]
    served, adopted, final_private = recorded["served"], recorded["adopted"], recorded["final_private"]

    # -- pushed updates: every node's updates reached its peers, the late one's included
    senders = {r["sender"] for r in received}
    assert senders == {f"n{i}" for i in range(N)}, senders
    assert len({r["level"] for r in received}) >= 2, "updates travelled at one level only"
    for r in received:
        shapes = {k: tuple(v.shape) for k, v in r["tensors"].items()}
        assert shapes == messenger.level_shapes(LADDER, r["level"]), (r["sender"], r["round"], r["level"])
        assert not any(k.startswith("private.") for k in shapes)
        snapshot = private_at_push[(r["sender"], r["round"])]
        # shapes do coincide (embeddings, norms; attention at higher levels): values must not
        assert any(tuple(v.shape) in {tuple(t.shape) for t in snapshot.values()} for v in r["tensors"].values())
        assert _equal_pairs(r["tensors"], snapshot) == [], (r["sender"], r["round"])

    # -- served state (FetchState): the `.shared` file, messenger tensors only, none equal to P
    assert served, "no node ever served its state"
    for s in served:
        assert s["path"].endswith(".shared.safetensors")
        shapes = {k: tuple(v.shape) for k, v in s["tensors"].items()}
        assert shapes == messenger.level_shapes(LADDER, s["level"]), (s["server"], s["round"])
        assert set(s["meta"]) <= set(rounds.SHARED_METADATA), s["meta"]  # nothing about P (its config) or the site
        assert s["private"], "the server's full checkpoint holds its private model"
        private = {k.removeprefix("private."): v for k, v in s["private"].items()}
        assert _equal_pairs(s["tensors"], private) == [], (s["server"], s["round"])

    # -- the late node caught up over FetchState: it adopted a messenger and kept its own P
    catch_ups = [a for a in adopted if a["node"] == LATE]
    assert catch_ups and {s["to"] for s in served} >= {LATE}
    for a in catch_ups:
        shapes = {k: tuple(v.shape) for k, v in a["tensors"].items()}
        assert shapes == messenger.level_shapes(LADDER, a["level"])  # the fetched file: messenger only
        before, after = a["private_before"], a["private_after"]
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        if a["level"] >= a["own_level"]:  # the messenger was replaced by (its slice of) the fetched one
            expected = messenger.slice_state(a["tensors"], LADDER, a["own_level"])
            assert all(torch.equal(a["messenger_after"][k], expected[k]) for k in expected)
    journal_sources = _sources(recorded["configs"], LATE)
    assert any(s.startswith("fetched:") for s in journal_sources), journal_sources
    # its private model is its own: not a copy of any peer's
    mine = final_private[LATE]
    for peer, theirs in final_private.items():
        if peer != LATE:
            assert not all(torch.equal(mine[k], theirs[k]) for k in mine), peer
            same = [k for k in mine if torch.equal(mine[k], theirs[k])]
            assert same == [], (peer, same)


def _sources(configs, name: str) -> list[str]:
    from fednode.store.journal import Journal

    cfg = next(c for c in configs if c.node.name == name)
    journal = Journal.open(cfg.node.data_dir / "journal.db")
    try:
        return [r.source for r in journal.rounds()]
    finally:
        journal.close()
