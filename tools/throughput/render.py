"""The human side of a throughput result: Markdown report, tokens/s bar plot, last-line summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.report import bar_plot, markdown_table


def _label(row: dict[str, Any]) -> str:
    level = "" if row["level"] is None else f" L{row['level']}"
    if row["model"] == "private+draft" and row["level"] is None:
        level = " self"  # the early exit or the feature draft (the report names which)
    return f"{row['model']}{level} b{row['batch_size']}"


def summary(result: dict[str, Any], paths: dict[str, Path]) -> dict[str, Any]:
    """The last stdout line: the headline figures and where the report is."""
    gen = result["generation"]

    def tps(model: str, bs: int, level: int | None = None) -> float | None:
        for row in gen:
            if row["model"] == model and row["batch_size"] == bs and row.get("supported") and (
                    level is None or row["level"] == level):
                return row["tokens_per_s"]
        return None

    a = result["assisted"]
    levels = sorted({row["level"] for row in gen if row["model"] == "messenger"})
    return {
        "bench": "throughput", "preset": result["preset"], "device": result["device"],
        "draft_speedup": result["draft_speedup"], "identical": result["identical"], "mismatches": a["mismatches"],
        "acceptance_rate": a.get("acceptance_rate"), "tokens_per_target_call": a.get("tokens_per_target_call"),
        "draft_level": a["draft_level"], "draft_steps": result["draft_training"].get("steps"),
        "private_params": result["private_params"], "messenger_params": result["messenger_params"],
        "param_ratio": result["param_ratio"], "draft_kind": a["draft_kind"], "draft_length": a["draft_length"],
        "alpha": a["alpha"], "cost": a["cost"], "head_coverage": a["head_coverage"],
        "bound": a["bound"], "best_bound": a["best_bound"], "loop": a.get("loop"),
        "other_loop": a.get("other_loop"),
        "expected_with_verify_cost": a.get("expected_with_verify_cost"),
        "decode_plan": (result.get("decode_layout") or {}).get("plan"),
        "paired_speedup": (a.get("paired") or {}).get("speedup"),
        "speedup_vs_own_loop_no_draft": (a.get("own_loop_no_draft") or {}).get("draft_speedup"),
        "exit_data": result["draft_training"].get("exit_data"),
        "exit_agreement": result["draft_training"].get("agreement_after"),
        "humaneval_agreement": (result["draft_training"].get("humaneval_agreement") or {}).get("agreement"),
        "generated_tokens": result["draft_training"].get("generated_tokens"),
        "private_tokens_per_s": {str(bs): tps("private", bs) for bs in result["batch_sizes"]},
        "assisted_tokens_per_s": tps("private+draft", 1),
        "messenger_tokens_per_s_b1": {str(lv): tps("messenger", 1, lv) for lv in levels},
        "train_tokens_per_s": None if result["training"] is None else {
            k: result["training"][k]["tokens_per_s"] for k in ("mutual", "private", "messenger")},
        "report": str(paths["json"]),
    }


def plot(result: dict[str, Any], path: Path) -> Path:
    rows = [r for r in result["generation"] if r.get("supported")]
    return bar_plot(path, [_label(r) for r in rows], [r["tokens_per_s"] for r in rows], "new tokens / s",
                    f"Greedy generation, {result['preset']} on {result['device']} "
                    f"({result['max_new_tokens']} new tokens, HumanEval prompts)")


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(result: dict[str, Any], meta: dict[str, Any], plot_name: str) -> str:
    a, m = result["assisted"], result["models"]
    machine = meta["machine"]
    lines = [
        f"# Throughput: {result['preset']}",
        "",
        f"- command: `{meta['command']}`",
        f"- date (UTC): {meta['date_utc']}; machine: {machine['cpu']}, {machine['usable_cores']} usable cores, "
        f"{machine['ram_gib']} GiB RAM, GPUs: {', '.join(machine['gpus']) or 'none'}; torch threads "
        f"{result['threads']}; device `{result['device']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- private model: {m['private']}, {m['private_params']:,} params; daemon config: `{m['daemon_config']}`",
        f"- draft: {_draft_line(result)}",
        f"- prompts: first {result['prompts']['count']} HumanEval prompts, cut to their last "
        f"{result['prompts']['max_prompt_tokens']} tokens (mean {result['prompts']['mean_prompt_tokens']:.0f}); "
        f"exactly {result['max_new_tokens']} new tokens per prompt, greedy",
        "",
        "## Draft (assisted generation)",
        "",
        f"- **draft_speedup = {_fmt(result['draft_speedup'])}** (assisted {_fmt(a['assisted_tokens_per_s'], '.1f')}"
        f" / plain {_fmt(a['plain_tokens_per_s'], '.1f')} tokens/s at batch 1): {a['verdict']}",
        f"- identical to plain greedy: **{'yes' if a['identical'] else 'NO'}** ({a['mismatches']} of "
        f"{a['compared']} prompts differ" + (f"; first at prompt {a['first_mismatch']['prompt']}, new token "
                                             f"{a['first_mismatch']['position']}" if a['first_mismatch'] else "")
        + ")",
        f"- acceptance: {a.get('draft_tokens_accepted', '–')} of {a.get('draft_tokens_proposed', '–')} draft "
        f"tokens accepted (rate {_fmt(a.get('acceptance_rate'), '.3f')}); {_fmt(a.get('tokens_per_target_call'))} "
        f"new tokens per private-model forward",
        f"- cost c = {a['cost']:.3f} (draft alone {_fmt(a['draft_tokens_per_s'], '.1f')} tokens/s at batch 1); "
        f"per-token acceptance alpha = {_fmt(a['alpha'], '.3f')} at draft length {a['draft_length']}: "
        f"Leviathan's bound **{_fmt(a['bound'])}** at that length, {_fmt(a['best_bound'])} at the best length",
        f"- draft length: {_length_line(a['draft_length_choice'])}",
        *_own_plain_line(a.get("own_loop_no_draft")),
        *_verify_line(a.get("verify_costs"), a.get("expected_with_verify_cost")),
        *_layout_line(result.get("decode_layout")),
        *_paired_line(a.get("paired")),
        f"- draft settings: {a['settings']}; tokenizer shared: {a['tokenizer']['shared']} ({a['tokenizer']['note']})",
        f"- loop: {a.get('loop')} (own: one draft forward per draft token and one private-model forward per step; "
        "transformers: assisted generation); drafting is measured at batch 1 only",
        f"- draft training: {_training_line(result['draft_training'])}",
        "",
        "## Generation tokens/s",
        "",
        markdown_table(["model", "level", "params", "batch", "tokens", "seconds", "tokens/s"], [
            [r["model"], r["level"], _params(result, r), r["batch_size"], r.get("tokens"), r.get("seconds"),
             r["tokens_per_s"] if r.get("supported") else "not supported"] for r in result["generation"]]),
        f"![tokens/s]({plot_name})",
        "",
    ]
    lines += _training_md(result["training"])
    return "\n".join(lines)


def _draft_line(result: dict[str, Any]) -> str:
    a, t = result["assisted"], result["draft_training"]
    if a["draft_kind"] == "features":  # the method names the head; say how much of P's output it covers
        head = "" if t["vocab"] is None else f"; the head covers {a['head_coverage']:.1%} of P's greedy output tokens"
        return f"{t['method']}{head}"
    if a["draft_kind"] == "self":
        head = "" if t["vocab"] is None else (
            f"; head over {t['vocab']:,} tokens, covering {a['head_coverage']:.1%} of P's greedy output tokens")
        return (f"the private model's own first {t['layers']} of {t['total_layers']} layers (early exit; own "
                f"parameters: {t['exit_params']:,}, the {t['exit']} exit{head})")
    ok = result["param_ratio"] >= result["min_param_ratio"]
    return (f"messenger level {a['draft_level']}, {result['messenger_params']:,} params; private/draft parameter "
            f"ratio **{result['param_ratio']:.2f}x** (asked: >= {result['min_param_ratio']:.0f}x"
            f"{'' if ok else ', NOT met'})")


def _paired_line(paired: dict[str, Any] | None) -> list[str]:
    if not paired:
        return []
    arms = ", ".join(f"{k} {v['tokens_per_s']:.1f}" for k, v in paired["arms"].items())
    ratios = ", ".join(f"**{v:.2f}x** over {k}" for k, v in paired["speedup"].items())
    return [f"- paired (each prompt decoded by every arm in turns, drift cancelled): tokens/s {arms}; drafted "
            f"{ratios}; identical: {'yes' if paired['identical'] else 'NO'}"]


def _layout_line(layout: dict[str, Any] | None) -> list[str]:
    if not layout:
        return []
    if layout.get("plan") is None:
        return [f"- decode layout: {layout['mode']} ({layout.get('note')})"]
    plan = ", ".join(f"{n}: {v}" for n, v in layout["plan"].items())
    return [f"- decode layout (matrix-product layout per row count, timed on this machine, used by every figure "
            f"above): {plan}; one plain token runs {layout['one_token_gain']:.2f}x F.linear's speed"]


def _verify_line(verify: list[float] | None, expected: float | None) -> list[str]:
    if not verify:
        return []
    costs = ", ".join(f"{n}: {v:.2f}" for n, v in enumerate(verify, 1))
    return [f"- one private-model forward over n tokens, in plain tokens (Leviathan takes 1): {costs}; the speedup "
            f"expected at the measured alpha, c and these costs: **{_fmt(expected)}**"]


def _own_plain_line(own: dict[str, Any] | None) -> list[str]:
    if own is None:
        return []
    return [f"- the own loop drafting nothing: {own['tokens_per_s']:.1f} tokens/s (identical: {own['identical']}); "
            f"drafted / that = **{_fmt(own['draft_speedup'])}** (the speedup with the loop's own overhead "
            "taken out of the baseline)"]


def _training_line(t: dict[str, Any]) -> str:
    line = f"{t.get('method')}; steps {t.get('steps')}"
    if t.get("exit_data") is None:
        return line
    line += f"; exit data {t['exit_data']}, loss {t.get('exit_loss', 'EAGLE')}, lr {t.get('lr')}"
    if t.get("generated_tokens") is not None:
        kind = "function" if t["exit_data"] == "function prompts" else "local-code"
        line += (f"; {t['generated_tokens']:,} tokens generated by P ({t['greedy_prompts']} {kind} prompts x "
                 f"{t['greedy_new_tokens']}, {t['generation_seconds']:.0f} s)")
    if t.get("agreement_after") is not None:
        line += (f"; top-1 agreement with P {t['agreement_before']:.3f} -> {t['agreement_after']:.3f}"
                 f" on {t.get('agreement_on', 'held-out code')}")
    he = t.get("humaneval_agreement")
    if he is not None:
        line += (f"; **first-token agreement with P's greedy output on {he['prompts']} HumanEval prompts "
                 f"{he['agreement']:.3f}** ({he['positions']:,} positions, teacher-forced)")
    return line


def _length_line(choice: dict[str, Any]) -> str:
    if choice["alpha"] is None and choice["prompts"] == 0:
        return "fixed by --draft-length"
    if choice["alpha"] is None:
        return "calibration gave no acceptance (token spaces translated): the calibration length"
    expected = choice.get("expected")
    by = "" if expected is None else f", expected with the measured verification costs {expected:.2f}"
    return (f"chosen by acceptance: alpha {choice['alpha']:.3f} and c {choice['cost']:.3f} on {choice['prompts']} "
            f"calibration prompts give length {choice['length']} (bound {choice['bound']:.2f}{by}"
            f"{'; 0 = do not draft, measured at 1' if choice['length'] == 0 else ''})")


def _params(result: dict[str, Any], row: dict[str, Any]) -> int | None:
    if row["model"] == "private":
        return result["private_params"]
    if row["level"] is None:  # the self-draft: P's own parameters plus its exit
        return None
    return result["models"]["messenger_levels"][row["level"]]["params"]


def _training_md(t: dict[str, Any] | None) -> list[str]:
    if t is None:
        return ["## Training", "", "not measured (--train-steps 0)", ""]
    rows = [[name, t[name]["steps"], t[name]["step_s"], t[name]["tokens_per_s"], t[name]["round_s"]]
            for name in ("mutual", "private", "messenger")]
    return ["## Training tokens/s (the daemon's trainer steps)", "",
            f"batch {t['batch_size']} x {t['seq_len']} tokens; a round is {t['round_steps']} steps "
            f"({t['round_tokens']:,} tokens). `mutual` is MutualTrainer.step (private + messenger, what a node "
            "runs); `private` / `messenger` are LocalTrainer steps of each model alone.", "",
            markdown_table(["trainer", "timed steps", "s/step", "tokens/s", "s/round"], rows), ""]
