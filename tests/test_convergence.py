"""fednode-bench convergence: the target derivation and x-to-target figures (pure), the analysis,
bad input, and one small real run of two modes end to end."""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
import warnings

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
    assert summary["target_nll_bpb"] == pytest.approx(1.93 * 1.02)  # fedavg's best + 2 %
    assert summary["target_set_by"] == "fedavg"
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


def test_compressed_arms_and_refusals_are_reported():
    runs = [_run("adaptive", 0, [3.0, 2.0, 1.9], 100), _run("fedavg", 0, [3.0, 2.6, 1.93], 1000),
            _run("adaptive-int8", 0, [3.0, 2.0, 1.9], 25), _run("fedavg-int8", 0, [3.0, 2.6, 1.93], 250),
            _run("local", 0, [3.0, 2.9, 2.8], 0)]
    runs[2]["refusals"] = {"n0": {"LOSS_JUMP": 2}, "n1": {"LOSS_JUMP": 1, "NOT_FINITE": 1}}
    summary = analyze.analyze(runs, tolerance=0.02)
    int8 = summary["int8"]["adaptive-int8"]
    assert int8["bytes_ratio"] == pytest.approx(75 / 3000) and int8["bytes_ratio_vs_fedavg_int8"] == pytest.approx(0.1)
    assert summary["arms"]["adaptive-int8"]["refusals"] == {"LOSS_JUMP": 3, "NOT_FINITE": 1}
    assert summary["arms"]["adaptive"]["refusals"] == {}
    text = analyze.markdown(summary, {"preset": "t", "command": "x", "machine": {}, "seeds": [0]})
    assert "adaptive-int8: LOSS_JUMP 3, NOT_FINITE 1" in text and "adaptive-int8 (int8 pushes)" in text


def test_the_ensemble_is_scored_against_fedavgs_target_too():
    runs = [_run("fedavg", 0, [3.0, 2.6, 2.0], 1000), _run("adaptive", 0, [3.0, 2.5, 2.2], 100)]
    for point, ens in zip(runs[1]["rounds"], [None, 2.03, 2.01], strict=True):  # not scored in round 1
        point["nll_ens"], point["nll_m"] = ens, None if ens is None else ens + 0.05
    summary = analyze.analyze(runs, tolerance=0.02)  # target 2.04: P never reaches it, P+M in round 2
    assert summary["arms"]["adaptive"]["rounds_to_target"]["n"] == 0
    ens = summary["ensemble"]["adaptive"]
    assert ens["rounds_ratio"] == pytest.approx(2 / 3) and ens["bytes_ratio"] == pytest.approx(200 / 3000)
    assert ens["seeds_at_target"] == 1 and "fedavg" not in summary["ensemble"]
    text = analyze.markdown(summary, {"preset": "t", "command": "x", "machine": {}, "seeds": [0]})
    assert "adaptive scored as its P+M ensemble: rounds_ratio 0.67" in text


def test_family_figures_give_gain_recovered_and_capacity_gain_per_family():
    runs = [_run("local", s, [3.0, 2.8], 0) for s in (0, 1)]
    runs += [_run("fedavg", s, [3.0, 2.4], 1000) for s in (0, 1)]
    runs += [_run("adaptive", s, [3.0, 2.5], 100) for s in (0, 1)]
    runs += [_run("static-0", 0, [3.0, 2.7], 50), _run("static-0", 1, [3.0, 2.66], 50)]
    runs += [_run("static-3", 0, [3.0, 2.6], 200), _run("static-3", 1, [3.0, 2.62], 200)]
    runs += [_run("prefix-adaptive", s, [3.0, 2.42], 600) for s in (0, 1)]
    summary = analyze.analyze(runs, tolerance=0.02)
    assert summary["gain_recovered"] == pytest.approx((2.8 - 2.5) / (2.8 - 2.4))
    assert summary["capacity_gain"] == pytest.approx(((2.7 - 2.6) + (2.66 - 2.62)) / 2)
    assert summary["capacity_gain_interval"]["smallest"] == 0 and summary["capacity_gain_interval"]["largest"] == 3
    prefix = summary["shared_prefix"]
    assert prefix["gain_recovered"] == pytest.approx((2.8 - 2.42) / (2.8 - 2.4))
    assert prefix["capacity_gain"] is None  # no prefix-static arms ran
    text = analyze.markdown(summary, {"preset": "t", "command": "x", "machine": {}, "seeds": [0, 1]})
    assert "gain_recovered = 0.750" in text and "shared-prefix: gain_recovered = 0.950" in text


def test_long_preset_arms_cover_both_families_and_the_ablations():
    preset = resolve("tiny-long")
    arms = preset.arms()
    assert arms == ["adaptive", "static-0", "static-3", "fedavg", "local", "prefix-adaptive", "prefix-static-0",
                    "prefix-static-4", "adaptive-nopublic", "adaptive-live", "adaptive-fedkd", "adaptive-plateau",
                    "adaptive-int8", "adaptive-fastgrow", "adaptive-public24", "adaptive-alpha2", "fedavg-int8",
                    "prefix-adaptive-int8"]
    assert all(Arm.parse(a).label == a for a in arms)
    assert preset.rounds >= 30 and preset.rounds * preset.steps_per_round * preset.batch_size * preset.seq_len >= 5e5
    assert preset.rounds_scored() == [5, 10, 15, 20, 25, 30]
    over = preset.overrides("adaptive", None, 0, "distilled", "nopublic")
    assert over["learning"]["public_steps"] == 0 and over["learning"]["ladder"] == "tiny-wide"
    assert "plateau_theta" not in over["negotiation"]  # adaptive follows the default thresholds
    assert over["learning"]["aggregation"] == "mean"  # the textbook FedAvg baseline, in every arm
    plateau = preset.overrides("adaptive", None, 0, "distilled", "plateau")
    assert plateau["negotiation"]["growth_signal"] == "plateau" and "public_steps" not in plateau["learning"]
    assert "ladder" not in preset.overrides("static", 2, 0, "shared-prefix")["learning"]
    with pytest.raises(ValueError, match="unknown mode"):
        Arm.parse("prefix-fedavg")
    with pytest.raises(ValueError, match="unknown mode"):
        Arm.parse("prefix-adaptive-live")  # the transfer ablations are the distilled family's
    assert Arm.parse("fedavg-int8") == Arm("fedavg", ablation="int8")
    fast = Arm.parse("prefix-adaptive-fastgrow")  # opt-in: the shared-prefix arm growing every 4 rounds
    assert fast == Arm("adaptive", family="shared-prefix", ablation="fastgrow")
    assert fast.label == "prefix-adaptive-fastgrow"
    assert preset.overrides("adaptive", None, 0, "shared-prefix", "fastgrow")["negotiation"]["min_round_gap"] == 1
    with pytest.raises(ValueError, match="unknown mode"):
        Arm.parse("fedavg-fastgrow")  # FedAvg shares everything from round 1: nothing to grow
    assert preset.overrides("fedavg", None, 0, ablation="int8")["learning"]["update_codec"] == "int8"
    assert preset.overrides("fedavg", None, 0)["learning"]["update_codec"] == "none"  # fp32: the baseline


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


def test_analysis_reads_back_unscored_rounds_from_strict_json(tmp_path):
    """Rounds between scorings hold NaN, which the report's strict JSON writes as null."""
    import json

    from tools.report import to_json

    nan = float("nan")
    runs = [_run("fedavg", 0, [nan, 2.5, nan, 2.2], 100), _run("local", 0, [nan, 2.9, nan, 2.8], 0),
            _run("adaptive", 0, [nan, 2.7, nan, 2.3], 10)]
    back = json.loads(to_json({"runs": runs}))["runs"]
    assert back[0]["rounds"][0]["nll_bpb"] is None
    summary = analyze.analyze(back, tolerance=0.02)
    assert summary["arms"]["fedavg"]["rounds_to_target"]["mean"] == 4
    assert summary["gain_recovered"] == pytest.approx((2.8 - 2.3) / (2.8 - 2.2))
    assert len(analyze.plots(back, summary, tmp_path)) == 4


def test_resume_runs_only_the_missing_arm_seed_pairs(tmp_path, monkeypatch):
    import tools.convergence.run as run_mod
    import tools.humaneval.data as data_mod
    from tools.convergence.cli import convergence
    from tools.convergence.run import RoundPoint, RunResult

    calls = []

    def fake_run(preset, arm, seed, workdir, problems, progress):
        calls.append((arm.label, seed))
        nll = {"fedavg": 2.0, "local": 2.6}.get(arm.label, 2.3)
        return RunResult(arm.label, seed, [RoundPoint(1, nll, nll, 10.0, 1.0, 0.0)], 1.0)

    monkeypatch.setattr(run_mod, "run_arm", fake_run)
    monkeypatch.setattr(data_mod, "load_problems", lambda n: [])
    out = tmp_path / "out"
    args = ["--preset", "tiny-long", "--modes", "adaptive,fedavg,local", "--rounds", "1", "--out", str(out)]
    first = CliRunner().invoke(convergence, [*args, "--seeds", "0"])
    assert first.exit_code == 0, first.output
    assert calls == [("adaptive", 0), ("fedavg", 0), ("local", 0)]
    calls.clear()
    second = CliRunner().invoke(convergence, [*args, "--seeds", "0,1", "--resume"])
    assert second.exit_code == 0, second.output
    assert calls == [("adaptive", 1), ("fedavg", 1), ("local", 1)]  # seed 0 kept from the first sitting
    assert '"gain_recovered": 0.5' in second.output.splitlines()[-1]
    calls.clear()
    third = CliRunner().invoke(convergence, [*args[:2], "--modes", "static-0", "--rounds", "1", "--out", str(out),
                                             "--seeds", "0", "--resume"])
    assert third.exit_code == 0, third.output
    assert calls == [("static-0", 0)]  # a partial rerun of another arm keeps every earlier run in the report
    import json
    data = json.loads((out / "convergence.json").read_text())
    assert sorted((r["arm"], r["seed"]) for r in data["runs"]) == sorted(
        [(a, s) for a in ("adaptive", "fedavg", "local") for s in (0, 1)] + [("static-0", 0)])
    assert data["metadata"]["seeds"] == [0, 1] and "static-0" in data["metadata"]["arms"]
    wrong = CliRunner().invoke(convergence, ["--preset", "tiny-cpu", "--out", str(out), "--resume"])
    assert wrong.exit_code != 0 and "holds a 'tiny-long' run" in wrong.output


def test_the_gpu_preset_runs_the_lora_family_against_fedavg_and_refuses_without_a_gpu(monkeypatch):
    preset = resolve("smollm2-gpu")
    assert preset.arms() == ["fedavg", "local", "lora-adaptive", "lora-static-0", "lora-static-3"]
    assert all(Arm.parse(a).label == a for a in preset.arms())
    assert Arm.parse("lora-static-2") == Arm("static", 2, "lora")
    with pytest.raises(ValueError, match="lora-adaptive or lora-static"):
        Arm.parse("lora-fedavg")
    over = preset.overrides("adaptive", None, 0, "lora")
    assert over["learning"]["family"] == "lora" and "ladder" not in over["learning"]
    assert over["train"]["device"] == "cuda" and over["train"]["precision"] == "bf16"
    assert preset.problems == 164 and preset.pass_at_1
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(bench, ["convergence", "--preset", "smollm2-gpu"])
    assert result.exit_code == 2 and "CUDA GPU" in result.output and "smollm2-135m" in result.output


def test_a_cpu_smoke_of_the_gpu_presets_lora_arm_scores_nll_and_pass_at_1(tmp_path):
    """Runs the smoke below in a fresh interpreter. In the long-lived test process, after the
    earlier tests, it crashed the whole run with SIGSEGV (exit 139: stop 18's CI and a fresh-clone
    run, 2026-12-03; main thread in C, two executor threads alive); alone it passed 10 of 10 runs.
    In a fresh interpreter it takes ~5 s, but one CI run in three it hung (idle in the sim
    harness's event loop after both nodes had committed both rounds; cause not found, see the
    session-10 note): up to 3 attempts, each bounded; a hung attempt's asyncio tasks (dumped by
    the child's watchdog) are reported as a warning, so the CI log shows where it hung."""
    hung = []
    for attempt in range(1, LORA_SMOKE_ATTEMPTS + 1):
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                   f"{__file__}::test_lora_smoke_in_a_fresh_process"],
                                  env={**os.environ, LORA_SMOKE_ENV: "1"}, capture_output=True, text=True,
                                  timeout=LORA_SMOKE_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            hung.append(f"attempt {attempt} hung for {LORA_SMOKE_TIMEOUT_S} s:\n{err[-4000:]}")
            continue
        assert proc.returncode == 0 and "1 passed" in proc.stdout, (proc.returncode, proc.stdout[-3000:],
                                                                    proc.stderr[-2000:])
        break
    else:
        pytest.fail("the LoRA smoke hung in every attempt:\n" + "\n".join(hung))
    for report in hung:
        warnings.warn(f"LoRA smoke: {report}", stacklevel=1)


LORA_SMOKE_ATTEMPTS, LORA_SMOKE_TIMEOUT_S, LORA_SMOKE_WATCHDOG_S = 3, 85, 60


def _dump_tasks_after(loops: list, after: float) -> None:
    """The child's watchdog: after `after` s, every asyncio task's stack to stderr (once)."""
    time.sleep(after)
    print(f"=== watchdog: still running after {after:.0f} s; asyncio tasks:", file=sys.stderr, flush=True)
    for loop in loops:
        for task in asyncio.all_tasks(loop):
            print(f"--- {task.get_name()}", file=sys.stderr)
            task.print_stack(limit=8, file=sys.stderr)
    sys.stderr.flush()


LORA_SMOKE_ENV = "FEDNODE_TEST_LORA_SMOKE"


@pytest.mark.skipif(os.environ.get(LORA_SMOKE_ENV) != "1", reason="run in a fresh process by the test above")
def test_lora_smoke_in_a_fresh_process(tmp_path, monkeypatch):
    """The smollm2-gpu code path (lora arm, merged-adapter scoring, greedy pass@1 with real
    execution) on CPU with the micro base: what CI can afford of the GPU study."""
    from tools.convergence.run import run_arm
    from tools.humaneval.data import load_problems

    loops: list = []
    real_run = asyncio.run

    def watched_run(coro, **kw):
        async def inside():
            loops.append(asyncio.get_running_loop())
            return await coro
        return real_run(inside(), **kw)

    monkeypatch.setattr(asyncio, "run", watched_run)
    threading.Thread(target=_dump_tasks_after, args=(loops, LORA_SMOKE_WATCHDOG_S), daemon=True).start()

    preset = resolve("smollm2-gpu", private="micro", device="cpu", precision="fp32", nodes=2, rounds=2,
                     steps_per_round=2, batch_size=2, seq_len=64, max_tokens=4_000, code_bytes=30_000,
                     round_timeout_s=30.0, problems=2, score_every=1, harness="sim")
    result = run_arm(preset, Arm.parse("lora-static-1"), 0, tmp_path, load_problems(2), lambda _msg: None)
    assert [p.round for p in result.points] == [1, 2]
    assert all(math.isfinite(p.nll_bpb) and p.bytes_per_node > 0 for p in result.points)
    assert math.isnan(result.points[0].pass1) and 0.0 <= result.points[-1].pass1 <= 1.0  # the last round only
