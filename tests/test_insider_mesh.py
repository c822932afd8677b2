"""Issue 11 against real daemons: a member with its own valid certificate (tools.harness.insider)
attacks a 3-node mesh with well-formed, correctly signed messages. One mesh start-up for every
attack, in sequence; after each the daemons are all running, keep committing rounds, and the bad
input is refused with a typed reason (the refusals are read from the nodes' JSON logs)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch

from fednode.mesh import negotiation as neg
from fednode.node.peer_service import FETCH_BURST
from fednode.transport.base import PeerCallError
from fednode.v1 import peer_pb2 as pb
from tools.harness import ProcessHarness
from tools.harness.insider import Insider

CONFIG = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 32, "max_tokens": 4_000},
    "train": {"steps_per_round": 2, "batch_size": 2, "round_timeout_s": 5.0},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
NAMES = ["node-0", "node-1", "node-2"]
BOUND_S = 120


def log_events(h: ProcessHarness, name: str, msg: str) -> list[dict]:
    out = []
    for line in (h.data_dir(name).parent / "node.log").read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("msg", "").startswith(msg):
            out.append(event)
    return out


def advance(h: ProcessHarness, rounds: int, names=NAMES) -> dict:
    mark = max(int(s["round"]) for s in h.wait_until("status", lambda st: True, 30, names).values())
    return h.wait_round(mark + rounds, BOUND_S, names)


def refused_push(insider: Insider, node: str, tensors, **kw) -> int:
    with pytest.raises(PeerCallError) as err:
        insider.push(node, tensors, **kw)
    return err.value.reason


def honest_catch_ups(h: ProcessHarness, lagger: str) -> int:
    """States the lagger took from an honest donor: fetched rounds in its journal, plus re-syncs in
    step with the mesh (no journal row: when the mesh agreed a level while it was away, it may come
    back level with the mesh's round but apart from its state)."""
    fetched = sum(1 for r in h.rounds(lagger) if r.source.startswith("fetched:node-"))
    return fetched + sum(1 for e in log_events(h, lagger, "re-synced with the mesh")
                         if str(e.get("peer", "")).startswith("node-"))


def rejoined_in_step(h: ProcessHarness, lagger: str, others: list[str]) -> bool:
    """Back level with the honest nodes and merging their updates (never mallory's) for 3 rounds in a
    row: a catch-up by merging, when the lagger's state stayed close enough that no fetch was needed
    (CI once saw node-0 at round 280 of the honest 280-281, merging node updates each round)."""
    recent = h.rounds(lagger)[-3:]
    if len(recent) < 3 or any("mallory" in r.merged_from or not any(p.startswith("node-") for p in r.merged_from)
                              for r in recent):
        return False
    ahead = max((rows[-1].round for o in others if (rows := h.rounds(o))), default=0)
    return recent[-1].round >= ahead - 2


LAG = 8  # rounds the others get ahead of a paused lagger: well past catchup_lag (2), so the lagger is
# still behind when its view of their signed rounds is fresh again after SIGCONT (it runs a few
# quick rounds of its own first; with a lag of 4 it sometimes never asked a donor)


def _lag_behind(h: ProcessHarness, lagger: str, others: list[str]) -> int:
    """Stop `lagger` (its state fetches from `others` failing) until they are LAG rounds ahead; its round before."""
    h.block_fetch(lagger, others)
    before = int(h.status(lagger)["round"])
    h.pause(lagger)
    try:
        h.wait_until("the others move ahead", lambda st: all(int(s["round"]) >= before + LAG for s in st.values()),
                     BOUND_S, others)
    finally:
        h.resume(lagger)
    return before


def test_one_insider_cannot_crash_stall_poison_or_steer_the_mesh(tmp_path):
    with ProcessHarness(tmp_path, 3, overrides=CONFIG, code_bytes=30_000) as h:
        h.start()  # every daemon forked before the insider's gRPC threads exist (a fork beside them
        h.wait_members(BOUND_S)  # can abort the child: exit -6 seen under load)
        with Insider(h.workdir / "pki") as mallory:
            _attack(h, mallory)


def _attack(h: ProcessHarness, mallory: Insider) -> None:
    advance(h, 3)
    start_rounds = {n: sum(1 for r in h.rounds(n) if r.source == "local" and math.isfinite(r.loss_after))
                    for n in NAMES}
    for name in NAMES:
        mallory.join(h.address(name))
    h.wait_until("mallory is a member", lambda st: all(s["peers_alive"] >= 3 for s in st.values()), 30)

    # 1. steer: a committed agreement of its own (epoch 2**63 crashed every daemon; epoch 1000 at
    # level 3 was adopted by all) -- refused, counted; the joiner that never pushes does not stall rounds
    for committed in (pb.Agreement(epoch=2**63, level=0, proposer="mallory"),
                      pb.Agreement(epoch=1000, level=3, previous_level=0, activate_round=1, proposer="mallory",
                                   growth_seed=neg.growth_seed(1000, 3))):
        mallory.sign_negotiation(round=1, ceiling=3, committed=committed)
        for name in NAMES:
            mallory.gossip(h.address(name))
    mallory.keep_gossiping([h.address(n) for n in NAMES])
    started = time.monotonic()
    statuses = advance(h, 6)
    assert time.monotonic() - started < 6 * 5.0 + 30, "rounds waited for the member that never pushes"
    assert all(int(s["epoch"]) < 1000 for s in statuses.values()), statuses
    for name in NAMES:
        refusals = log_events(h, name, "refused") + log_events(h, name, "refused a capacity proposal")
        assert any(e.get("reason") == "MALFORMED" for e in log_events(h, name, "refused peer record")) or \
            any(e.get("reason") == "UNPROVEN_AGREEMENT" for e in refusals), name

    # 2. pushes: a huge header integer, a huge weight, a sign-flipped copy of the victim's own state
    victim = "node-1"
    own, meta, _ = mallory.fetch(victim)
    level = int(meta.get("level", "0"))
    open_round = int(h.status(victim)["round"]) + 1
    assert refused_push(mallory, victim, own, epoch=2**63, round_=open_round, level=level) == pb.MALFORMED
    assert refused_push(mallory, victim, own, round_=open_round, weight=1e30, level=level) == pb.MALFORMED
    assert refused_push(mallory, victim, own, round_=open_round, weight=1e300, level=level) == pb.MALFORMED
    flipped = {k: -v for k, v in own.items()}
    mallory.push(victim, flipped, round_=open_round, weight=1000.0, level=level)  # well-formed: accepted ...
    h.wait_until("the flipped update refused at merge",
                 lambda st: any(e.get("peer") == "mallory"
                                for e in log_events(h, victim, "refused an update at merge")), 60, [victim])
    assert math.isfinite(float(h.status(victim)["last_loss"]))  # ... and never merged

    # 3. a FetchState flood: one catch-up's worth served, the rest RATE_LIMITED
    outcomes = mallory.fetch_flood("node-2", 30, concurrency=6)
    assert outcomes.get("ok", 0) <= FETCH_BURST and outcomes.get("RATE_LIMITED", 0) >= 30 - FETCH_BURST, outcomes

    # 4. the catch-up lure: mallory signs the mesh's highest round and serves an all-NaN state. The
    # lagger's state fetches from the honest nodes fail (a fault plan; gossip still flows), so
    # mallory is always asked: its state must be refused, never adopted
    mallory.serve_state({k: torch.full_like(v, math.nan) for k, v in own.items()}, level=level)
    lagger = "node-2"
    mallory.keep_gossiping([h.address(n) for n in NAMES], interval=0.15, mirror_round=True,
                           lagging=frozenset({lagger}))
    _lag_behind(h, lagger, ["node-0", "node-1"])
    # The state must be refused for its NaNs. A lagger just resumed from its pause may first refuse
    # it by its label alone (mallory claims the honest nodes' round, ahead of the lagger's stale view
    # of their signed rounds: MALFORMED, seen in CI); mallory is then blacklisted for 10 round
    # timeouts (50 s) and asked again with a fresh view, and that fetch reaches the content check.
    def content_refusals() -> list[dict]:
        return [e for e in log_events(h, lagger, "refused a caught-up state")
                if e.get("peer") == "mallory" and e.get("reason") in ("NOT_FINITE", "SHAPE_MISMATCH")]

    h.wait_until("the lagger asked mallory and refused its state for its content",
                 lambda st: bool(content_refusals()), BOUND_S, NAMES)
    assert mallory.fetches_served >= 1 and content_refusals()
    caught = honest_catch_ups(h, lagger)
    h.block_fetch(lagger, [])
    h.wait_until("the lagger caught up from an honest donor",
                 lambda st: honest_catch_ups(h, lagger) > caught,
                 BOUND_S, NAMES)
    assert not any(r.source == "fetched:mallory" for r in h.rounds(lagger))

    # 4b. the lure again, for a lagger that never asked mallory, whose state now stalls after its
    # first chunk: the catch-up has one deadline, the stall is a counted TRUNCATED refusal, mallory
    # is blacklisted and the lagger catches up from an honest donor (the round loop never hangs)
    mallory.serve_state(own, level=level, stall=True)
    lagger = "node-0"
    mallory.keep_gossiping([h.address(n) for n in NAMES], interval=0.15, mirror_round=True,
                           lagging=frozenset({lagger}))
    _lag_behind(h, lagger, ["node-1", "node-2"])
    h.wait_until("the lagger gave up on mallory's stalled state",
                 lambda st: any(e.get("peer") == "mallory" and e.get("reason") == "TRUNCATED"
                                for e in log_events(h, lagger, "state fetch failed")), BOUND_S, NAMES)
    caught = honest_catch_ups(h, lagger)
    h.block_fetch(lagger, [])
    h.wait_until("the lagger caught up from an honest donor after the stall",
                 lambda st: honest_catch_ups(h, lagger) > caught or rejoined_in_step(h, lagger, ["node-1", "node-2"]),
                 BOUND_S, NAMES)

    # 4c. the lure a third time, for the last node that never asked mallory: 4 KiB of random bytes
    # with a matching sha256 (the victim exited 5, "checkpoint corrupt", and systemd kept it down):
    # a counted MALFORMED refusal, the process lives on and catches up from an honest donor
    mallory.serve_state(None, raw=os.urandom(4096))
    lagger = "node-1"
    mallory.keep_gossiping([h.address(n) for n in NAMES], interval=0.15, mirror_round=True,
                           lagging=frozenset({lagger}))
    _lag_behind(h, lagger, ["node-0", "node-2"])
    h.wait_until("the lagger refused mallory's random bytes",
                 lambda st: any(e.get("peer") == "mallory" and e.get("reason") == "MALFORMED"
                                for e in log_events(h, lagger, "refused a caught-up state")), BOUND_S, NAMES)
    assert h.alive(lagger)
    caught = honest_catch_ups(h, lagger)
    h.block_fetch(lagger, [])
    h.wait_until("the lagger caught up from an honest donor after the random bytes",
                 lambda st: honest_catch_ups(h, lagger) > caught or rejoined_in_step(h, lagger, ["node-0", "node-2"]),
                 BOUND_S, NAMES)

    # 5. liveness: mallory relays node-0's hello with a heartbeat far above its own and left = true
    # (node-0 looked gone to everyone until it restarted): refused, node-0 stays alive
    reply = mallory.gossip(h.address("node-1"))
    [real] = [r for r in reply.records if pb.HelloBody.FromString(r.hello.body).node_id == "node-0"]
    forged = pb.PeerRecord(hello=real.hello, heartbeat=real.heartbeat + 1000, left=True,
                           heartbeat_proof=os.urandom(32), last_round=real.last_round)
    for name in ("node-1", "node-2"):
        mallory.gossip(h.address(name), [forged])
    h.wait_until("the forged leave refused",
                 lambda st: all(any(e.get("peer") == "node-0" and e.get("reason") == "BAD_SIGNATURE"
                                    for e in log_events(h, n, "refused peer message")) for n in ("node-1", "node-2")),
                 30, ["node-1", "node-2"])
    for name in ("node-1", "node-2"):  # their views of node-0, as they gossip them
        [seen] = [r for r in mallory.gossip(h.address(name)).records
                  if pb.HelloBody.FromString(r.hello.body).node_id == "node-0"]
        assert not seen.left and seen.heartbeat < real.heartbeat + 1000, (name, seen.heartbeat, seen.left)

    # 6. Sybil: a ceiling is one vote per certificate. mallory claiming ceiling 0 is 1 of 4 votes:
    # the quorum (2/3 of the live members) still affords what the honest ceilings afford; a second
    # certificate makes the liars 2 of 5 (over a third): then they can hold the level down, as
    # docs/reliability.md says
    mallory.ceiling = 0
    mallory.sign_negotiation(round=mallory.claimed_round, ceiling=0)
    mallory.keep_gossiping([h.address(n) for n in NAMES])
    advance(h, 2)
    statuses = advance(h, 1)
    honest = min(int(s["ceiling"]) for s in statuses.values())
    assert honest > 0, statuses  # no [budget]: every honest node affords the whole ladder
    assert all(int(s["quorum_level"]) == honest for s in statuses.values()), statuses
    with Insider(h.workdir / "pki", "sybil-1") as sybil:
        for name in NAMES:
            sybil.join(h.address(name))
        sybil.ceiling = 0
        sybil.sign_negotiation(round=mallory.claimed_round, ceiling=0)
        sybil.keep_gossiping([h.address(n) for n in NAMES])
        h.wait_until("two liars in five hold the quorum level down",
                     lambda st: all(int(s["quorum_level"]) == 0 and s["peers_alive"] >= 4 for s in st.values()),
                     BOUND_S, NAMES)

    # after everything: every daemon runs and commits, no committed round was lost or rewritten,
    # and the honest nodes' held-out loss is no worse than before the attacks (bounded damage)
    statuses = advance(h, 2)
    # ... and in one agreement: a node away while the others agreed (each lagger above) adopts it
    # from their proof although mallory never acks (one stayed at epoch 0 for good, seen in CI)
    h.wait_until("every honest node in the same agreement",
                 lambda st: len({(int(s["epoch"]), int(s["level"])) for s in st.values()}) == 1, BOUND_S, NAMES)
    for name in NAMES:
        assert h.alive(name), name
        assert math.isfinite(float(statuses[name]["last_loss"])), statuses[name]
        rounds = h.rounds(name)  # read after the status: the node may have committed once more since
        numbers = [r.round for r in rounds]
        assert numbers == sorted(set(numbers)) and numbers[-1] >= int(statuses[name]["round"]), (name, numbers)
        trained = [r.loss_after for r in rounds if r.source == "local" and math.isfinite(r.loss_after)]
        before, after = _mean(trained[:start_rounds[name]][-3:]), _mean(trained[-3:])
        print(f"{name}: held-out loss before the attacks {before:.4f}, after {after:.4f}")
        assert after <= before * 1.05, (name, before, after)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
