"""A node that starts while the mesh is rounds ahead (a new site, or one restarted after a long
outage) hears the mesh before its first round, catches up at once and merges in its first round;
the others reach it at once (their channel to its address is redialled, not left in a reconnect
backoff built up while it was down); nobody logs a warning about it. Real daemons."""

from __future__ import annotations

import json

from tools.harness import ProcessHarness

CONFIG = {
    "model": {"preset": "micro"},
    "data": {"seq_len": 32, "max_tokens": 4_000},
    "train": {"steps_per_round": 2, "batch_size": 2, "round_timeout_s": 5.0},
    "mesh": {"gossip_interval_s": 0.3, "suspect_after_s": 2.0, "dead_after_s": 5.0},
}
HARNESS_WARNINGS = ("fault injection enabled", "fault plan now")  # the harness's own fault plumbing


def events(h: ProcessHarness, name: str) -> list[dict]:
    out = []
    for line in (h.data_dir(name).parent / "node.log").read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_a_late_joiner_catches_up_at_once_and_merges_in_its_first_round_without_alarms(tmp_path):
    with ProcessHarness(tmp_path, 4, overrides=CONFIG, code_bytes=30_000) as h:
        early, late = h.names[:3], h.names[3]
        h.start(early)  # node-3 is a seed of each: they dial it (and fail) all along
        h.wait_round(8, 180, early)
        h.start([late])

        def merged_after_catch_up(_statuses) -> bool:
            return any(r.source == "local" and r.merged_from for r in h.rounds(late))

        h.wait_until("the late node merges its peers' updates", merged_after_catch_up, 120, [late])
        rounds = h.rounds(late)
        assert rounds[0].source.startswith("fetched:") and rounds[0].round >= 8, rounds[:3]  # no round 1 of its own
        first_merge = next(r for r in rounds if r.source == "local" and r.merged_from)
        # within two rounds of catching up (a peer that pushed the next round while it was still
        # catching up was told NOT_READY; the round after, everyone is in step)
        assert first_merge.round <= rounds[0].round + 2, [(r.round, r.source, r.merged_from) for r in rounds[:4]]

        log = events(h, late)
        serving = next(e["ts"] for e in log if e["msg"] == "serving")
        caught = next(e["ts"] for e in log if e["msg"] == "caught up")
        assert caught - serving < CONFIG["train"]["round_timeout_s"], (serving, caught)
        for name in h.names:
            alarms = [e["msg"] for e in events(h, name) if e["level"] in ("warning", "error")
                      and not e["msg"].startswith(HARNESS_WARNINGS) and e.get("peer") == late]
            assert not alarms, (name, alarms)
