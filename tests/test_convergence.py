"""fednode-bench convergence: the target derivation and x-to-target figures (pure), the analysis,
bad input, and one small real run of two modes end to end."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from tools.bench_cli import main as bench
from tools.convergence import analyze
from tools.convergence.presets import Arm, resolve
from tools.convergence.targets import derive_target, first_reaching, mean_curve, mean_interval, ratio, to_target


def test_target_is_the_best_value_any_curve_reached_plus_tolerance():
    target, mode = derive_target({"a": [3.0, 2.5, 2.2], "b": [3.0, 2.0, 2.1]}, 0.02)
    assert mode == "b" and target == pytest.approx(2.04)
    target, mode = derive_target({"a": [math.nan, 2.5], "b": [math.inf, 3.0]}, 0.0)
    assert (target, mode) == (2.5, "a"), "non-finite points never set the target"
    with pytest.raises(ValueError, match="no finite value"):
        derive_target({"a": [math.nan]})
    with pytest.raises(ValueError, match="tolerance"):
        derive_target({"a": [1.0]}, 1.5)


def test_to_target_takes_the_cost_of_the_first_round_at_or_below_it():
    curve = [3.0, 2.5, 2.04, 1.9, 2.5]
    assert first_reaching(curve, 2.04) == 2
    assert to_target(curve, [1, 2, 3, 4, 5], 2.04) == 3
    assert to_target(curve, [10, 20, 30, 40, 50], 1.95) == 40
    assert to_target(curve, [1, 2, 3, 4, 5], 1.0) is None
    with pytest.raises(ValueError, match="costs"):
        to_target(curve, [1, 2], 2.0)


def test_mean_interval_uses_student_t_and_counts_misses():
    iv = mean_interval([4.0, 6.0, None])
    assert iv["n"] == 2 and iv["of"] == 3 and iv["mean"] == 5.0
    assert iv["hi"] - iv["mean"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert mean_interval([None, None])["mean"] is None
    assert mean_interval([3.0]) == {"n": 1, "of": 1, "mean": 3.0, "lo": 3.0, "hi": 3.0}
    assert ratio(3.0, 6.0) == 0.5 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None
    assert mean_curve([[1.0, 2.0, 3.0], [3.0, 4.0]]) == [2.0, 3.0]


def _run(arm: str, seed: int, nll: list[float], bytes_per_round: float) -> dict:
    return {"arm": arm, "seed": seed, "rounds": [
        {"round": i + 1, "nll_bpb": v, "val_loss": v, "bytes_per_node": bytes_per_round * (i + 1),
         "wall_s": 10.0 * (i + 1), "level": 0.0} for i, v in enumerate(nll)]}


def test_analysis_gives_the_headline_ratios_from_the_runs():
    runs = [_run("adaptive", s, [3.0, 2.0, 1.9], 100) for s in (0, 1)]
    runs += [_run("fedavg", s, [3.0, 2.6, 2.1, 1.93], 1000) for s in (0, 1)]
    runs += [_run("local", 0, [3.0, 2.9, 2.8], 0)]
    summary = analyze.analyze(runs, tolerance=0.02)
    assert summary["target_nll_bpb"] == pytest.approx(1.9 * 1.02)
    a, f = summary["arms"]["adaptive"], summary["arms"]["fedavg"]
    assert a["rounds_to_target"]["mean"] == 3 and f["rounds_to_target"]["mean"] == 4
    assert summary["rounds_ratio"] == pytest.approx(3 / 4)
    assert summary["bytes_ratio"] == pytest.approx(300 / 4000)
    assert summary["arms"]["local"]["rounds_to_target"]["n"] == 0
    weaker = summary["at_adaptive_best"]  # the best adaptive reached (1.9): fedavg (1.93) never gets there
    assert weaker["target_nll_bpb"] == 1.9 and weaker["arms"]["adaptive"]["rounds"]["mean"] == 3
    assert weaker["arms"]["fedavg"]["rounds"]["n"] == 0 and weaker["rounds_ratio"] is None
    text = analyze.markdown(summary, {"preset": "t", "command": "x", "machine": {}, "seeds": [0, 1]})
    assert "not reached (0/1)" in text and "| adaptive |" in text


def test_arms_and_presets_parse_or_explain():
    assert Arm.parse("static-2") == Arm("static", 2) and Arm.parse("static-2").label == "static-2"
    assert Arm.parse("fedavg").label == "fedavg"
    with pytest.raises(ValueError, match="unknown mode"):
        Arm.parse("static-x")
    preset = resolve("tiny-cpu", rounds=3, seeds=None)
    assert preset.rounds == 3 and preset.seeds == (0, 1, 2)
    assert preset.arms() == ["adaptive", "static-0", "static-3", "fedavg", "local"]
    assert preset.arms(every_level=True) == ["adaptive", "static-0", "static-1", "static-2", "static-3", "fedavg",
                                             "local"]
    o = preset.overrides("static", 2, seed=1)
    assert o["learning"]["static_level"] == 2 and o["model"]["seed"] == 1
    assert o["train"]["keep_checkpoints"] > preset.rounds, "every round's checkpoint is kept for scoring"


def test_bad_input_gets_one_line_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(bench, ["convergence", "--reanalyze", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "convergence.json").write_text("{not json")
    corrupt = runner.invoke(bench, ["convergence", "--reanalyze", str(tmp_path)])
    assert corrupt.exit_code == 2 and "corrupt" in corrupt.output
    bad_mode = runner.invoke(bench, ["convergence", "--modes", "fastest"])
    assert bad_mode.exit_code == 2 and "unknown mode" in bad_mode.output
    bad_seeds = runner.invoke(bench, ["convergence", "--seeds", "a,b"])
    assert bad_seeds.exit_code == 2 and "--seeds" in bad_seeds.output
    afile = tmp_path / "file"
    afile.write_text("x")
    bad_out = runner.invoke(bench, ["convergence", "--out", str(afile), "--modes", "local", "--rounds", "1"])
    assert bad_out.exit_code == 2 and "is a file" in bad_out.output


def test_a_real_two_mode_run_writes_reports_and_a_json_last_line(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(bench, [
        "convergence", "--modes", "static-0,fedavg", "--seeds", "0", "--rounds", "2", "--nodes", "2",
        "--problems", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["benchmark"] == "convergence" and set(last["rounds_to_target"]) == {"static-0", "fedavg"}
    data = json.loads((out / "convergence.json").read_text())
    assert data["complete"] and len(data["runs"]) == 2
    for run in data["runs"]:
        assert [p["round"] for p in run["rounds"]] == [1, 2]
        assert all(math.isfinite(p["nll_bpb"]) and p["bytes_per_node"] > 0 for p in run["rounds"])
    fedavg, static = (next(r for r in data["runs"] if r["arm"] == a) for a in ("fedavg", "static-0"))
    assert fedavg["rounds"][-1]["bytes_per_node"] > 2 * static["rounds"][-1]["bytes_per_node"], \
        "fedavg sends the whole private model, static-0 only the smallest messenger"
    for png in ("nll_vs_rounds", "nll_vs_bytes", "level_vs_rounds", "val_loss_vs_rounds"):
        assert (out / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = CliRunner().invoke(bench, ["convergence", "--reanalyze", str(out), "--tolerance", "0.1"])
    assert again.exit_code == 0, again.output
    relaxed = json.loads(again.output.strip().splitlines()[-1])["target_nll_bpb"]
    assert relaxed == pytest.approx(last["target_nll_bpb"] / 1.02 * 1.1)
