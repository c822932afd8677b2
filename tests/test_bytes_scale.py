"""Each node's messenger bytes per round must not grow with the mesh size.

Full daemons (the real node code) over the in-memory transport twin, in one process (the same
measurement as `fednode-bench scaling`, tools/scaling.py): a 4-node and a 12-node mesh, static
mode at one fixed level, micro preset, tiny data. Each node pushes to a fixed number of peers per
round (the exponential graph, `[mesh] fanout`), so what one node sends per round is the same
whether the mesh has 4 peers or 12. Measured on the journal's `bytes_sent` over three
steady-state rounds (after the whole mesh is live), mean over nodes and rounds.
"""

from __future__ import annotations

from fednode.config import LearningSection
from fednode.learning import messenger
from fednode.learning.compress import compress
from fednode.node.tensorstream import encode
from tools.scaling import FANOUT, LEVEL, measure

ROUNDS = 3  # measured rounds per node, after the whole mesh is live


def run_mesh(root, n: int, round_timeout_s: float) -> tuple[list[list], float]:
    result = measure(root, n, ROUNDS, round_timeout_s)
    return result.rounds, result.wall_s


def test_messenger_bytes_per_node_per_round_do_not_grow_with_mesh_size(tmp_path, caplog):
    ladder = messenger.LADDERS["micro"]
    wire, meta = compress({k: _zeros(s) for k, s in messenger.level_shapes(ladder, LEVEL).items()},
                          LearningSection().update_codec)  # the default codec, as the nodes push
    per_push = encode(wire, {"round": "1", "sender": "n00", **meta}).total_size  # one level-LEVEL messenger
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
