"""`fednode-bench frontier`: Pareto decisions, run discovery, the ensemble's generation, and the
command end to end on checkpoints written the way a daemon writes them (micro models)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from tools.frontier.pareto import Point, best_at_speed, dominated_area, first_round_reaching, pareto_front
from tools.frontier.runs import find_runs, rounds_to_measure
from tools.throughput.errors import BenchFailure


def test_pareto_front_keeps_only_undominated_points_fastest_first():
    a, b, c, d = Point("a", 2.0, 100.0), Point("b", 1.5, 50.0), Point("c", 2.1, 60.0), Point("d", 1.5, 40.0)
    assert [p.label for p in pareto_front([a, b, c, d])] == ["a", "b"]  # c is worse and slower than a; d than b
    # the area below worst = 2.5: a strip (2.5 - 2.0) x 100 plus (2.0 - 1.5) x 50
    assert dominated_area([a, b, c, d], 2.5) == pytest.approx(0.5 * 100 + 0.5 * 50)
    assert dominated_area([a, b], 2.5) > dominated_area([a], 2.5) > dominated_area([], 2.5) == 0.0
    assert best_at_speed([a, b, c, d], 55.0) is a and best_at_speed([a, b], 10.0) is b
    assert best_at_speed([a], 500.0) is None
    assert first_round_reaching([(10, 5.0), (5, 1.0), (15, 9.0)], 4.0) == 10
    assert first_round_reaching([(5, 1.0)], 4.0) is None


def test_a_repeating_output_is_told_apart_from_varied_code():
    from tools.frontier.measure import DEGENERATE, distinct_fraction

    assert distinct_fraction([[7] * 64]) < DEGENERATE  # '\n' x 64: any draft predicts it
    assert distinct_fraction([list(range(40)) + [1] * 24]) > DEGENERATE
    assert distinct_fraction([[1, 2], [3, 3]]) == 0.75 and distinct_fraction([]) == 0.0


def test_rounds_to_measure_are_every_kth_and_the_last():
    assert rounds_to_measure([1, 2, 3, 4, 5, 6, 7], 3) == [3, 6, 7]
    assert rounds_to_measure([], 5) == []
    with pytest.raises(ValueError):
        rounds_to_measure([1], 0)


def test_the_ensembles_cached_greedy_loop_equals_recomputing_the_mixture():
    from tools.frontier.ensemble import ensemble_greedy
    from tools.humaneval.nll import EnsembleLM

    torch.manual_seed(0)
    first, second = _micro_private(), _micro_messenger(1)
    ids = torch.randint(5, 500, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    out = ensemble_greedy(first, second, ids, mask, 6)
    both = EnsembleLM(first, second)
    for row in range(2):  # no cache, unpadded: argmax of the mixture token by token
        seq = ids[row : row + 1, int((mask[row] == 0).sum()):]
        for step in range(6):
            with torch.no_grad():
                nxt = both(input_ids=seq).logits[0, -1].argmax()
            assert int(nxt) == int(out[row, step])
            seq = torch.cat([seq, nxt.view(1, 1)], dim=-1)


def _tok():
    import tempfile
    from pathlib import Path

    from fednode.learning.models import PRESETS
    from fednode.learning.tokenizer import build_tokenizer

    return build_tokenizer(Path(tempfile.gettempdir()) / "fednode-test-tok", vocab_size=PRESETS["micro"].vocab_size)


def _micro_private():
    from fednode.learning.models import build_model

    return build_model("micro", _tok(), seed=0).eval()


def _micro_messenger(level: int):
    from fednode.learning import messenger as msg

    return msg.build_messenger(msg.LADDERS["micro"], level, _tok(), seed=0).eval()


def _write_run(root, arm: str, family: str, level: int, rounds: int) -> None:
    from fednode.learning.models import state_tensors
    from fednode.store.checkpoint import save_checkpoint

    private = _micro_private()
    for r in range(1, rounds + 1):
        tensors = {f"private.{k}": v for k, v in state_tensors(private).items()}
        if family == "distilled":
            tensors |= {f"messenger.{k}": v for k, v in state_tensors(_micro_messenger(level)).items()}
        meta = {"preset": "micro", "family": family, "ladder": "micro" if family == "distilled" else "",
                "level": str(level), "mode": "adaptive", "round": str(r), "node": "n0"}
        save_checkpoint(root / f"{arm}-seed0" / "n0" / "state" / "checkpoints", r, tensors, meta)


def test_frontier_measures_every_model_of_a_run_and_writes_the_report(tmp_path):
    from tools.frontier.cli import frontier

    run = tmp_path / "work"
    _write_run(run, "adaptive", "distilled", 1, 2)
    _write_run(run, "prefix-adaptive", "shared-prefix", 1, 2)
    (run / "stray-dir").mkdir()
    assert [(r.arm, r.seed) for r in find_runs(run)] == [("adaptive", 0), ("prefix-adaptive", 0)]
    out = tmp_path / "report"
    result = CliRunner().invoke(frontier, ["--from-run", str(run), "--every", "2", "--problems", "2", "--prompts", "1",
                                           "--max-new-tokens", "4", "--batch-sizes", "1,2", "--out", str(out),
                                           "--cache", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["bench"] == "frontier" and last["all_drafts_identical"] is True and last["points"] == 4 + 3
    assert "best_draft_speedup_varied_output" in last
    data = json.loads((out / "frontier.json").read_text())
    models = {(r["arm"], r["model"]) for r in data["rows"]}
    assert models == {("adaptive", m) for m in ("P", "M", "P+M", "P<-M")} | {
        ("prefix-adaptive", m) for m in ("P", "M", "P<-M")}
    assert all(r["round"] == 2 for r in data["rows"])
    drafted = [r for r in data["rows"] if r["model"] == "P<-M"]
    assert all(r["tokens_per_s"]["2"] is None and r["identical"] and r["draft_length"] >= 1 for r in drafted)
    assert data["analysis"]["1"]["front"] and set(data["analysis"]["1"]["reach"]) == {"distilled", "shared-prefix"}
    for bs in (1, 2):
        assert (out / f"frontier-b{bs}.png").read_bytes()[:4] == b"\x89PNG"
    assert "Pareto-optimal" in (out / "frontier.md").read_text()


def test_frontier_refuses_a_directory_without_runs_in_one_line(tmp_path):
    from tools.frontier.cli import frontier

    with pytest.raises(BenchFailure, match="holds no <arm>-seed<N> run"):
        find_runs(tmp_path)
    result = CliRunner().invoke(frontier, ["--from-run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and "is not a directory" in lines[0], result.output
