"""fednode-bench throughput: pure decisions, assisted == greedy on a real micro pair, the CLI contract."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from tools.throughput import metrics
from tools.throughput.cli import throughput
from tools.throughput.speculative import MAX_VERIFY


@pytest.fixture(scope="module")
def micro_pair(tmp_path_factory):
    from tools.throughput.presets import load_pair

    return load_pair("micro", seed=0, cache=tmp_path_factory.mktemp("cache"))


# --- pure decisions -------------------------------------------------------------------------------


def test_draft_speedup_and_verdict():
    assert metrics.draft_speedup(30.0, 20.0) == pytest.approx(1.5)
    assert metrics.draft_speedup(None, 20.0) is None
    with pytest.raises(ValueError):
        metrics.draft_speedup(1.0, 0.0)
    assert metrics.speedup_verdict(0.5).startswith("slower")
    assert metrics.speedup_verdict(1.2).startswith("below 1.5x")
    assert metrics.speedup_verdict(2.0).startswith("useful")
    assert metrics.tokens_per_second(100, 4.0) == 25.0
    with pytest.raises(ValueError):
        metrics.tokens_per_second(1, 0.0)


def test_acceptance_from_target_call_lengths():
    # prompt 10; call 1 sees prompt + 3 drafts; then drafts of 2, 0 and 4 tokens (lengths are draft + 1)
    acc = metrics.acceptance([13, 3, 1, 5], prompt_len=10, new_tokens=9)
    assert (acc.target_calls, acc.proposed, acc.accepted) == (4, 9, 5)
    assert acc.rate == pytest.approx(5 / 9)
    assert acc.tokens_per_target_call == pytest.approx(9 / 4)
    both = acc + acc
    assert (both.proposed, both.accepted, both.new_tokens) == (18, 10, 18)
    with pytest.raises(ValueError, match="impossible"):
        metrics.acceptance([11, 2], prompt_len=10, new_tokens=10)  # 2 drafts cannot yield 8 accepted


def test_compare_outputs_counts_mismatches():
    same = metrics.compare_outputs([[1, 2, 3], [4]], [[1, 2, 3], [4]])
    assert same.identical and same.mismatches == 0
    diff = metrics.compare_outputs([[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 9], [6, 7]])
    assert not diff.identical and diff.mismatches == 2
    assert diff.first_mismatch == {"prompt": 1, "position": 1}
    assert not metrics.compare_outputs([], []).identical  # nothing compared proves nothing


def test_batches_are_full_and_pick_draft_level():
    assert metrics.make_batches(3, 2) == [[0, 1], [2, 0]]
    assert metrics.make_batches(2, 8) == [[0, 1, 0, 1, 0, 1, 0, 1]]
    assert metrics.make_batches(4, 1) == [[0], [1], [2], [3]]
    assert metrics.pick_draft_level([10, 20, 40], private_params=200, min_ratio=8) == 1
    assert metrics.pick_draft_level([100, 200], private_params=200, min_ratio=8) == 0
    assert metrics.truncate_prompt([1, 2, 3, 4], 2) == [3, 4]


# --- real generation on a micro pair ----------------------------------------------------------------


def test_assisted_output_identical_to_greedy(micro_pair):
    from tools.throughput.generation import greedy_config, time_assisted, time_plain

    tok = micro_pair.tokenizer
    prompts = [tok("def add(a, b):\n    return", add_special_tokens=False)["input_ids"],
               tok("import os\n\nclass Path:\n", add_special_tokens=False)["input_ids"]]
    config = greedy_config(tok, 12)
    draft = micro_pair.messenger(0)
    plain = time_plain(micro_pair.private, prompts, 1, config)
    assisted = time_assisted(micro_pair.private, draft, prompts, config)
    assert [len(o) for o in plain.outputs] == [12, 12]  # exactly max_new_tokens each
    assert assisted.outputs == plain.outputs
    assert metrics.compare_outputs(plain.outputs, assisted.outputs).identical
    acc = assisted.acceptance
    assert acc.new_tokens == 24 and acc.accepted == 24 - acc.target_calls and acc.accepted <= acc.proposed
    batched = time_plain(micro_pair.private, prompts, 2, config)
    assert batched.tokens == 24 and batched.tokens_per_s > 0


def test_micro_pair_shares_the_tokenizer(micro_pair):
    from tools.throughput.presets import tokenizer_check

    check = tokenizer_check(micro_pair.private, micro_pair.messenger(0), micro_pair.tokenizer)
    assert check["shared"]


def test_tiny_cpu_pair_is_at_least_8x():
    from fednode.learning import messenger
    from fednode.learning.models import PRESETS, build_model, count_parameters
    from fednode.learning.tokenizer import shipped_tokenizer_dir

    assert shipped_tokenizer_dir(4096) is not None
    from fednode.learning.tokenizer import build_tokenizer

    private = build_model(PRESETS["small"], build_tokenizer(shipped_tokenizer_dir(4096), 4096), seed=0)
    level0 = messenger.level_param_count(messenger.LADDERS["tiny"], 0)
    assert count_parameters(private) >= 8 * level0


# --- from a run's checkpoint --------------------------------------------------------------------------


def test_from_run_loads_the_checkpointed_models(micro_pair, tmp_path):
    import torch

    from fednode.learning.models import state_tensors
    from fednode.store.checkpoint import save_checkpoint
    from tools.throughput.from_run import load_run

    trained = micro_pair.messenger(1)
    with torch.no_grad():
        trained.model.norm.weight.fill_(0.5)  # a value no fresh messenger has
    tensors = {f"private.{k}": v for k, v in state_tensors(micro_pair.private).items()}
    tensors |= {f"messenger.{k}": v for k, v in state_tensors(trained).items()}
    save_checkpoint(tmp_path / "node-a" / "checkpoints", 3, tensors, {"round": "3", "level": "1", "mode": "static"})
    pair, draft, info = load_run(tmp_path, micro_pair)  # a results dir holding one node dir
    assert info["level"] == 1 and info["round"] == "3"
    assert torch.all(draft.model.norm.weight == 0.5)
    assert draft.config.num_attention_heads == trained.config.num_attention_heads


# --- the command ----------------------------------------------------------------------------------------


def _error_line(result) -> str:
    """The one error line (progress lines may precede it; no traceback, nothing after it)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    return errors[0]


def test_cli_writes_report_and_last_line_json(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(throughput, ["--preset", "micro", "--limit", "1", "--max-new-tokens", "6",
                                             "--batch-sizes", "1,2", "--draft-steps", "0", "--train-steps", "0",
                                             "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("draft_speedup", "identical", "private_params", "messenger_params", "param_ratio",
                "private_tokens_per_s", "assisted_tokens_per_s", "messenger_tokens_per_s_b1"):
        assert key in last
    assert last["identical"] is True and last["draft_speedup"] > 0
    assert last["param_ratio"] == pytest.approx(last["private_params"] / last["messenger_params"])
    data = json.loads((out / "throughput.json").read_text())
    assert data["metadata"]["command"] and data["metadata"]["machine"]["cores"] >= 1
    assisted_b2 = [r for r in data["generation"] if r["model"] == "private+draft" and r["batch_size"] == 2]
    assert assisted_b2 and assisted_b2[0]["supported"] is False
    assert len([r for r in data["generation"] if r["model"] == "messenger" and r["supported"]]) == 2 * 4
    assert "draft_speedup" in (out / "throughput.md").read_text()
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    a = data["assisted"]  # the draft length was chosen from a calibration run, and the bound is beside it
    assert a["draft_length_choice"]["prompts"] >= 1 and a["draft_length"] >= 1 and a["cost"] > 0
    assert a["alpha"] is not None and 0.0 <= a["alpha"] <= 1.0 and a["bound"] is not None
    assert data["decode_layout"]["plan"] is not None  # auto by default, on a CPU


def test_cli_self_draft_is_ps_own_prefix_and_keeps_its_greedy_output(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(throughput, ["--preset", "micro", "--limit", "1", "--max-new-tokens", "8",
                                             "--batch-sizes", "1", "--draft", "self", "--exit-layers", "1",
                                             "--exit-steps", "2", "--draft-vocab", "64", "--draft-length", "3",
                                             "--train-steps", "0", "--cache", str(tmp_path / "cache"),
                                             "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["identical"] is True and last["draft_kind"] == "self" and last["draft_length"] == 3
    data = json.loads((out / "throughput.json").read_text())
    info = data["draft_training"]
    assert info["layers"] == 1 and info["exit"] == "layer" and info["steps"] == 2 and info["vocab"] >= 64
    assert info["agreement_after"] is not None and data["assisted"]["draft_length_choice"]["prompts"] == 0
    assert any(r["model"] == "self-draft" for r in data["generation"])
    assert 0.0 <= data["assisted"]["head_coverage"] <= 1.0
    assert "early exit" in (out / "throughput.md").read_text()


def test_cli_bad_draft_length_and_self_from_run_are_usage_errors(tmp_path):
    result = CliRunner().invoke(throughput, ["--draft-length", "0", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "must be >= 1" in result.output
    result = CliRunner().invoke(throughput, ["--draft", "self", "--from-run", str(tmp_path), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "drop --from-run" in result.output


def test_cli_bad_out_is_one_line(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    result = CliRunner().invoke(throughput, ["--preset", "micro", "--out", str(target)])
    assert result.exit_code != 0
    assert "is a file" in _error_line(result)


@pytest.mark.parametrize("kind", ["missing", "empty", "no-messenger"])
def test_cli_bad_from_run_is_one_line(tmp_path, kind):
    import torch

    from fednode.store.checkpoint import save_checkpoint

    run = tmp_path / "run"
    if kind != "missing":
        run.mkdir()
    if kind == "no-messenger":  # a fedavg-mode checkpoint: the whole model, no private./messenger. split
        save_checkpoint(run / "checkpoints", 1, {"model.norm.weight": torch.ones(4)}, {"mode": "fedavg"})
    result = CliRunner().invoke(throughput, ["--preset", "micro", "--from-run", str(run), "--limit", "1",
                                             "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    line = _error_line(result)
    expected = {"missing": "is not a directory", "empty": "holds no round-", "no-messenger": "adaptive or static"}
    assert expected[kind] in line


def test_cli_bad_batch_sizes_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(throughput, ["--batch-sizes", "1,x", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "comma-separated" in result.output


def test_speedup_bound_matches_leviathan_and_picks_the_draft_length_by_acceptance():
    from tools.throughput.metrics import best_draft_length, speedup_bound

    assert speedup_bound(0.0, 0, 0.5) == 1.0  # no draft: plain decoding
    assert abs(speedup_bound(0.8, 3, 0.1) - (1 - 0.8 ** 4) / (0.2 * 1.3)) < 1e-12
    assert speedup_bound(1.0, 4, 0.0) == 5.0
    # the tiny-cpu pair: c = 0.46 caps even 90 % acceptance below 1.5x
    assert max(speedup_bound(0.9, g, 0.46) for g in range(21)) < 1.5
    gamma, bound = best_draft_length(0.9, 0.05)
    assert gamma > 5 and bound > 3.0  # a cheap, accurate draft drafts long
    assert best_draft_length(0.04, 0.2) == (0, 1.0)  # 4 % acceptance: drafting never pays
    assert best_draft_length(0.6, 0.3)[0] < best_draft_length(0.8, 0.3)[0]
    with pytest.raises(ValueError):
        speedup_bound(1.5, 2, 0.1)


def test_the_draft_length_pays_for_the_measured_verification_cost_of_its_shape():
    from tools.throughput.metrics import best_draft_length_measured, speedup_with_verify_cost

    verify = [0.9, 1.3, 3.0, 1.4, 1.45]  # verifying 3 tokens (length 2) is a slow kernel shape here
    length, expected = best_draft_length_measured(0.8, 0.05, verify)
    assert length == 4 and expected == pytest.approx((1 - 0.8 ** 5) / 0.2 / (4 * 0.05 + 1.45))
    assert speedup_with_verify_cost(0.8, 0, 0.05, verify) == pytest.approx(1 / 0.9)  # the loop drafting nothing
    assert best_draft_length_measured(0.05, 0.3, [1.0, 1.6, 1.7])[0] == 0  # it does not pay: do not draft
    with pytest.raises(ValueError, match="verifying 4 tokens"):
        speedup_with_verify_cost(0.5, 3, 0.1, [1.0, 1.2, 1.3])
    with pytest.raises(ValueError, match="> 0"):
        best_draft_length_measured(0.5, 0.1, [1.0, 0.0])
    # a tree of 2 guesses per depth verifies 2 * length + 1 tokens: only lengths whose forward was measured
    assert speedup_with_verify_cost(0.8, 2, 0.05, verify, width=2) == pytest.approx(
        (1 - 0.8 ** 3) / 0.2 / (2 * 0.05 + 1.45))
    assert best_draft_length_measured(0.8, 0.05, verify, width=2)[0] == 2
    with pytest.raises(ValueError, match="width 2 needs the cost of verifying 7 tokens"):
        speedup_with_verify_cost(0.8, 3, 0.05, verify, width=2)


def test_a_loop_step_costs_its_forward_plus_what_the_loop_spends_beyond_it():
    from tools.throughput.metrics import best_draft_length_measured
    from tools.throughput.speculative import step_costs

    forwards = [0.84, 1.35, 1.97, 1.44]  # bare forwards (measured on the 2-core CPU)
    steps = step_costs(forwards, 1.0)  # the loop drafting nothing runs at plain speed: 0.16 per step is the loop's
    assert steps == pytest.approx([1.0, 1.51, 2.13, 1.60])
    assert best_draft_length_measured(0.3, 0.05, forwards)[1] == pytest.approx(1 / 0.84)  # a phantom 1.19x
    assert best_draft_length_measured(0.3, 0.05, steps) == (0, pytest.approx(1.0))  # honest: do not draft
    assert step_costs(forwards, 0.5) == forwards  # a loop faster than its forward (noise) adds nothing


def test_alpha_is_recovered_from_tokens_per_target_call():
    from tools.throughput.metrics import alpha_from_tokens_per_call

    for alpha in (0.0, 0.3, 0.75, 0.95):
        tpc = (1 - alpha ** 5) / (1 - alpha)
        assert abs(alpha_from_tokens_per_call(tpc, 4) - alpha) < 1e-6
    assert alpha_from_tokens_per_call(5.0, 4) > 0.999999  # every draft token accepted
    assert alpha_from_tokens_per_call(1.0, 4) < 1e-6  # none
    with pytest.raises(ValueError, match="outside"):
        alpha_from_tokens_per_call(6.0, 4)
    with pytest.raises(ValueError, match="gamma"):
        alpha_from_tokens_per_call(1.5, 0)


def test_cli_self_draft_of_an_untrained_built_private_model_is_refused_in_one_line(tmp_path):
    result = CliRunner().invoke(throughput, ["--preset", "tiny-cpu", "--draft", "self", "--limit", "1",
                                             "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "untrained private model" in _error_line(result)


def test_the_draft_length_asked_for_is_the_one_drafted(micro_pair):
    """transformers reads the draft knobs from the assistant's own generation config: a fixed length
    must reach it (it once did not: every call drafted under the assistant's defaults)."""
    from tools.humaneval.data import load_problems
    from tools.throughput.generation import fixed_draft_length, greedy_config, time_assisted
    from tools.throughput.run import encode_prompts

    prompts = encode_prompts(micro_pair.tokenizer, load_problems(2), 64)
    draft = micro_pair.messenger(0)
    before = draft.generation_config.num_assistant_tokens
    for length in (1, 3):
        run = time_assisted(micro_pair.private, draft, prompts, fixed_draft_length(greedy_config(
            micro_pair.tokenizer, 12), length))
        a = run.acceptance
        full = a.target_calls * length  # every call verifies exactly `length` draft tokens (the last may be cut)
        assert full - 2 * length <= a.proposed <= full, (length, a)
    assert draft.generation_config.num_assistant_tokens == before  # the assistant's own config is restored


def test_cli_self_draft_on_ps_greedy_continuations_with_the_own_loop(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(throughput, ["--preset", "micro", "--limit", "1", "--max-new-tokens", "8",
                                             "--batch-sizes", "1", "--draft", "self", "--exit-layers", "1",
                                             "--exit-steps", "3", "--draft-vocab", "64", "--draft-length", "2",
                                             "--exit-data", "greedy", "--exit-loss", "top1", "--greedy-prompts", "6",
                                             "--greedy-tokens", "5", "--compare-loops", "--train-steps", "0",
                                             "--cache", str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["identical"] is True and last["loop"] == "own" and last["exit_data"] == "greedy"
    assert last["generated_tokens"] == 6 * 5  # P's greedy tokens the exit learned from
    assert last["other_loop"]["loop"] == "transformers" and last["other_loop"]["identical"] is True
    data = json.loads((out / "throughput.json").read_text())
    info, split = data["draft_training"], data["assisted"]["loop_split"]
    assert info["exit_loss"] == "top1" and info["greedy_prompts"] == 6 and 0.0 <= info["agreement_after"] <= 1.0
    assert split["verify_calls"] >= 1 and split["verify_cost"] > 0 and split["verified_tokens"] == 3
    assert "tokens generated by P" in (out / "throughput.md").read_text()


def test_cli_feature_draft_reads_ps_features_and_keeps_its_greedy_output(tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(throughput, ["--preset", "micro", "--limit", "1", "--max-new-tokens", "8",
                                             "--batch-sizes", "1", "--draft", "features", "--exit-steps", "2",
                                             "--draft-vocab", "64", "--draft-length", "3", "--tree-width", "2",
                                             "--greedy-prompts", "20", "--draft-code-tokens", "3000",
                                             "--greedy-tokens", "4", "--train-steps", "1", "--agreement-prompts",
                                             "6", "--cache",
                                             str(tmp_path / "cache"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last["identical"] is True and last["draft_kind"] == "features" and last["loop"] == "own"
    assert last["exit_data"] == "function prompts" and last["generated_tokens"] == 20 * 4
    data = json.loads((out / "throughput.json").read_text())
    info = data["draft_training"]
    assert info["steps"] == 2 and info["vocab"] >= 64 and 0.0 <= info["agreement_after"] <= 1.0
    assert 0 < info["code_tokens"] <= 3000  # local-code blocks trained on beside P's continuations
    he = info["humaneval_agreement"]
    assert he["prompts"] == 6 and he["positions"] == 6 * 8 and 0.0 <= last["humaneval_agreement"] <= 1.0
    assert any(r["model"] == "feature-draft" and r["tokens_per_s"] > 0 for r in data["generation"])
    a = data["assisted"]  # the default tree for a feature draft: 2 guesses per depth and the lookup branch
    assert a["cost"] > 0 and (a["tree_width"], a["lookup_branch"], a["lookup_depth"]) == (2, True, 3)
    assert a["loop_split"]["verified_tokens"] == 3 * 3 + 1  # at most 3 depths of 2 guesses and a lookup node
    a = data["assisted"]
    steps, forwards = a["verify_costs"], a["forward_costs"]  # a loop step costs its forward and the loop's work
    assert len(steps) == MAX_VERIFY and all(s >= f > 0 for s, f in zip(steps, forwards, strict=True))
    bare = data["assisted"]["own_loop_no_draft"]  # the own loop with no draft: P's greedy tokens, one per forward
    assert bare["identical"] is True and bare["tokens_per_s"] > 0 and last["speedup_vs_own_loop_no_draft"] > 0
    assert data["training"] is not None  # P trains in float32 after generating
    assert "feature draft (EAGLE)" in (out / "throughput.md").read_text()
    paired = data["assisted"]["paired"]  # plain, the bare own loop and the drafted loop in turns, per prompt
    assert paired["identical"] is True and paired["prompts"] == 1
    assert set(paired["speedup"]) == {"plain", "own_loop_no_draft"} and last["paired_speedup"] == paired["speedup"]
    assert all(v["tokens"] == 8 and v["seconds"] > 0 for v in paired["arms"].values())
    layout = data["decode_layout"]  # every figure ran with the layouts timed on this machine, reported
    assert layout["mode"] == "auto" and set(layout["plan"]) == {str(n) for n in range(1, MAX_VERIFY + 1)}
    assert set(layout["seconds"]["1"]) == {"linear", "w-xt", "x-wt"} and last["decode_plan"] == layout["plan"]
    assert "decode layout" in (out / "throughput.md").read_text()


def test_cli_feature_draft_file_trains_once_then_loads(tmp_path):
    args = ["--preset", "micro", "--limit", "1", "--max-new-tokens", "6", "--batch-sizes", "1", "--draft",
            "features", "--exit-steps", "2", "--draft-vocab", "64", "--draft-length", "2", "--greedy-prompts", "20",
            "--greedy-tokens", "3", "--train-steps", "0", "--agreement-prompts", "0", "--cache",
            str(tmp_path / "cache"), "--draft-file", str(tmp_path / "draft.safetensors")]
    first = CliRunner().invoke(throughput, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    assert (tmp_path / "draft.safetensors").is_file() and "saved to" in first.output
    again = CliRunner().invoke(throughput, [*args, "--dtype", "bfloat16", "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    data = json.loads((tmp_path / "b" / "throughput.json").read_text())
    assert "loaded from a file" in data["draft_training"]["method"] and data["dtype"] == "bfloat16"
    assert "greedy data" not in again.output  # nothing trained the second time
    (tmp_path / "draft.safetensors").write_bytes(b"junk")
    bad = CliRunner().invoke(throughput, [*args, "--out", str(tmp_path / "c")])
    assert bad.exit_code == 1 and "not a readable feature-draft file" in _error_line(bad)


@pytest.mark.parametrize(("args", "message"), [
    (["--draft", "self", "--exit-data", "code", "--exit-loss", "top1"], "apply to --exit-data greedy"),
    (["--draft", "self", "--exit-data", "code", "--greedy-prompts", "8"], "apply to --exit-data greedy"),
    (["--exit-data", "greedy"], "apply to --draft self"),
    (["--exit-loss", "kl"], "apply to --draft self"),
    (["--loop", "sideways"], "Invalid value for '--loop'"),
    (["--draft", "features", "--exit-data", "greedy"], "apply to --draft self: the feature"),
    (["--draft", "features", "--exit-layers", "3"], "apply to --draft self: the feature"),
    (["--draft", "features", "--loop", "transformers"], "only the own loop"),
    (["--dtype", "float16"], "Invalid value for '--dtype'"),
    (["--draft-file", "x.safetensors"], "--draft-file applies to --draft features"),
    (["--tree-width", "2"], "--lookup-branch and --lookup-depth apply to --draft features"),
    (["--lookup-branch"], "--lookup-branch and --lookup-depth apply to --draft features"),
    (["--tree-nodes", "3"], "--lookup-branch and --lookup-depth apply to --draft features"),
    (["--draft-code-tokens", "100"], "--draft-code-tokens applies to --draft features"),
    (["--draft", "features", "--no-lookup-branch", "--lookup-depth", "3"], "--lookup-depth applies to --lookup-branch"),
    (["--lookup-depth", "3"], "--lookup-branch and --lookup-depth apply to --draft features"),
    (["--draft", "features", "--tree-width", "5"], "Invalid value for '--tree-width'"),
])
def test_cli_greedy_and_loop_options_out_of_place_are_usage_errors(tmp_path, args, message):
    result = CliRunner().invoke(throughput, [*args, "--out", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output


def test_paired_timing_takes_turns_and_reverses_the_order_on_every_other_prompt():
    from tools.throughput.generation import GenRun
    from tools.throughput.paired import paired_runs, paired_summary

    calls = []

    def arm(name, seconds):
        def run(prompts):
            calls.append((name, prompts[0][0]))
            out = GenRun(1, tokens=4, seconds=seconds, calls=1, outputs=[[prompts[0][0]] * 4])
            return out
        return run

    runs = paired_runs({"plain": arm("plain", 2.0), "drafted": arm("drafted", 1.0)}, [[1], [2], [3]])
    assert calls == [("plain", 1), ("drafted", 1), ("drafted", 2), ("plain", 2), ("plain", 3), ("drafted", 3)]
    summary = paired_summary(runs, "plain", "drafted")
    assert summary["speedup"] == {"plain": pytest.approx(2.0)} and summary["identical"] is True
    assert runs["plain"].tokens == 12 and runs["plain"].outputs == [[1] * 4, [2] * 4, [3] * 4]
    with pytest.raises(ValueError, match="at least one"):
        paired_runs({}, [[1]])
