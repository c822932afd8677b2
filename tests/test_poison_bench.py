"""`fednode-bench poison` (tools/poison): the pure scoring and attacks, and one tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from tools.bench_cli import main
from tools.poison import ATTACKS
from tools.poison.bench import MeshRun, analyse, poison, pool, ratios, recommend


def test_ratios_worst_mean_and_verdict():
    r = ratios({"a": 2.1, "b": 1.0}, {"a": 2.0, "b": 1.0})
    assert r["per_node"] == pytest.approx({"a": 1.05, "b": 1.0})
    assert r["worst"] == pytest.approx(1.05) and r["mean"] == pytest.approx(1.025)
    assert r["within"]  # exactly at the line counts as within
    assert not ratios({"a": 2.2, "b": 1.0}, {"a": 2.0, "b": 1.0})["within"]
    assert ratios({"a": 1.9}, {"a": 2.0})["within"]  # better than clean is within


def test_ratios_refuse_a_verdict_on_missing_or_non_finite_losses():
    assert not ratios({"a": math.nan, "b": 1.0}, {"a": 2.0, "b": 1.0})["within"]
    assert not ratios({"a": math.inf}, {"a": 2.0})["within"]
    assert not ratios({"a": 1.0}, {"a": 1.0, "b": 1.0})["within"]  # an honest node without a loss
    assert math.isnan(ratios({"a": 1.0}, {"a": 0.0})["worst"])


def test_pool_takes_the_worst_over_seeds():
    pooled = pool([ratios({"a": 1.0}, {"a": 1.0}), ratios({"a": 1.1}, {"a": 1.0})])
    assert pooled["worst"] == pytest.approx(1.1) and pooled["mean"] == pytest.approx(1.05)
    assert not pooled["within"] and pooled["seeds"] == 2
    assert pool([ratios({"a": 0.97, "b": 1.01}, {"a": 1.0, "b": 1.0})])["max_dev"] == pytest.approx(0.03)


def _cell(worst: float) -> dict:
    return {"loss": {"within": worst <= 1.05, "worst": worst}, "shared_loss": {"within": True, "worst": 1.0}}


def test_recommend_the_cheapest_aggregation_that_holds_every_attack():
    cost = {"mean": {"loss": {"worst": 1.0}}, "median": {"loss": {"worst": 1.015}},
            "trimmed-mean": {"loss": {"worst": 1.01}}}
    attacked = {"mean": {"scaled": _cell(1.3)}, "median": {"scaled": _cell(1.01)},
                "trimmed-mean": {"scaled": _cell(1.02)}}
    rec = recommend(cost, attacked)
    assert rec["aggregation"] == "trimmed-mean" and rec["holding"] == ["trimmed-mean", "median"]
    assert rec["tied"] == ["median"]  # 1.015 is within 1 % of 1.01
    assert recommend(cost, {"mean": {"scaled": _cell(1.3)}})["aggregation"] is None


def test_analyse_pairs_each_attacked_run_with_the_clean_run_of_its_aggregation():
    def run(agg, attack, loss, repeat=False):
        return MeshRun(agg, attack, 0, repeat, loss={"n0": loss, "n1": loss}, shared_loss={"n0": 1.0, "n1": 1.0})

    runs = [run("mean", None, 2.0), run("mean", "scaled", 3.0), run("median", None, 2.1),
            run("median", "scaled", 2.1), run("mean", None, 2.02, repeat=True)]
    figures = analyse(runs, ["mean", "median"], ["scaled"], [0])
    assert figures["attacked"]["mean"]["scaled"]["loss"]["worst"] == pytest.approx(1.5)
    assert figures["attacked"]["median"]["scaled"]["loss"]["worst"] == pytest.approx(1.0)
    assert figures["attacked"]["median"]["scaled"]["loss_vs_clean_mean"]["worst"] == pytest.approx(1.05)
    assert figures["clean_cost"]["median"]["loss"]["worst"] == pytest.approx(1.05)
    assert figures["noise_floor"]["loss"]["worst"] == pytest.approx(1.01)
    assert figures["recommendation"]["aggregation"] == "median"


def test_attacks_keep_names_shapes_and_dtypes():
    before = {"w": torch.zeros(3, 2), "b": torch.ones(4)}
    state = {"w": torch.full((3, 2), 0.5), "b": torch.full((4,), 2.0)}
    for attack in ATTACKS:
        out = poison(attack, before, state, seed=1)
        assert {k: (v.shape, v.dtype) for k, v in out.items()} == {k: (v.shape, v.dtype) for k, v in state.items()}
    scaled = poison("scaled", before, state, seed=1)
    assert torch.allclose(scaled["w"], torch.full((3, 2), -5.0)) and torch.allclose(scaled["b"], torch.full((4,), -9.0))
    assert torch.allclose(poison("stealth", before, state, seed=1)["b"], torch.full((4,), -2.0))
    assert torch.allclose(poison("stealth", before, state, seed=1, stealth_scale=-4.0)["b"], torch.full((4,), -3.0))
    assert torch.equal(poison("sign-flip", before, state, seed=1)["w"], -state["w"])
    assert all(torch.isnan(v).all() for v in poison("nan", before, state, seed=1).values())
    huge = poison("huge", before, state, seed=1)
    assert math.sqrt(sum(float(v.double().pow(2).sum()) for v in huge.values())) == pytest.approx(1e5, rel=1e-5)
    noise = poison("noise", before, state, seed=1)
    delta = math.sqrt(sum(float((state[k] - before[k]).pow(2).sum()) for k in state))
    moved = math.sqrt(sum(float((noise[k] - state[k]).double().pow(2).sum()) for k in state))
    assert moved == pytest.approx(3.0 * delta, rel=1e-4)
    assert torch.equal(poison("noise", before, state, seed=1)["w"], noise["w"])  # seeded
    with pytest.raises(ValueError):
        poison("nope", before, state, seed=1)


def test_unknown_names_are_usage_errors(tmp_path):
    result = CliRunner().invoke(main, ["poison", "--attacks", "scaled,bogus", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "bogus" in result.output


def test_poison_command_end_to_end_tiny(tmp_path):
    """3 nodes, 2 rounds, one aggregation, one attack: the report's structure and the last line."""
    out = tmp_path / "poison"
    result = CliRunner().invoke(main, ["poison", "--nodes", "3", "--rounds", "2", "--aggregations", "mean",
                                       "--attacks", "stealth", "--steps", "1", "--seeds", "0", "--no-repeat",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["benchmark"] == "poison" and set(last) >= {"attacked", "clean_cost", "recommended", "report"}
    cell = last["attacked"]["mean"]["stealth"]
    assert set(cell) == {"p_worst", "m_worst", "within"} and math.isfinite(cell["p_worst"])
    assert last["clean_cost"]["mean"]["p_worst"] == pytest.approx(1.0)
    data = json.loads((out / "poison.json").read_text())
    assert data["metadata"]["aggregations"] == ["mean"] and data["metadata"]["attacks"] == ["stealth"]
    runs = data["runs"]
    assert [(r["aggregation"], r["attack"]) for r in runs] == [("mean", None), ("mean", "stealth")]
    for r in runs:
        assert sorted(r["loss"]) == ["n0", "n1"] and all(math.isfinite(v) for v in r["loss"].values())
        assert all(math.isfinite(v) for v in r["shared_loss"].values())
    assert runs[1]["attacker_pushes"] >= 2  # two rounds, each to the honest nodes it is scheduled for
    detail = data["attacked"]["mean"]["stealth"]
    assert set(detail) >= {"loss", "shared_loss", "loss_vs_clean_mean", "refused_at_push", "attacker_merged"}
    assert "Insider poisoning" in (out / "poison.md").read_text()


def test_reanalyze_an_interrupted_run_uses_its_whole_seeds(tmp_path):
    from dataclasses import asdict

    from tools import report
    from tools.poison.bench import Setup

    def run(agg, attack, seed, loss):
        return MeshRun(agg, attack, seed, loss={"n0": loss}, shared_loss={"n0": 1.0}).to_dict()

    meta = {"command": "fednode-bench poison", "date_utc": "2026-12-02T00:00:00Z", "seeds": [0, 1],
            "machine": {"cpu": "test", "cores": 2, "load_avg_1m": 0.0}, "code": {"commit": "abc", "uncommitted": []},
            "setup": asdict(Setup(nodes=2)), "aggregations": ["mean", "median"], "attacks": ["stealth"],
            "tolerance": 0.05}
    runs = [run("mean", None, 0, 2.0), run("median", None, 0, 2.0), run("mean", "stealth", 0, 2.4),
            run("median", "stealth", 0, 2.02), run("mean", None, 1, 2.0)]  # seed 1 interrupted
    report.write_report(tmp_path, "poison", {"metadata": meta, "complete": False, "runs": runs}, "# partial\n")
    result = CliRunner().invoke(main, ["poison", "--reanalyze", str(tmp_path)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.output.strip().splitlines()[-1])
    assert last["recommended"] == "median" and not last["attacked"]["mean"]["stealth"]["within"]
    data = json.loads((tmp_path / "poison.json").read_text())
    assert data["seeds_analysed"] == [0] and data["complete"] is False and len(data["runs"]) == 5
    assert "Partial: seeds [0] of [0, 1]" in (tmp_path / "poison.md").read_text()
    empty = tmp_path / "empty"
    report.write_report(empty, "poison", {"metadata": meta, "complete": False, "runs": runs[-1:]}, "# partial\n")
    assert CliRunner().invoke(main, ["poison", "--reanalyze", str(empty)]).exit_code == 2
