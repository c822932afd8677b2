"""The human side of a throughput result: Markdown report, tokens/s bar plot, last-line summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.report import bar_plot, markdown_table


def _label(row: dict[str, Any]) -> str:
    level = "" if row["level"] is None else f" L{row['level']}"
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
        "param_ratio": result["param_ratio"],
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
        f"- draft: messenger level {a['draft_level']}, {result['messenger_params']:,} params; private/draft "
        f"parameter ratio **{result['param_ratio']:.2f}x** (asked: >= {result['min_param_ratio']:.0f}x"
        f"{'' if result['param_ratio'] >= result['min_param_ratio'] else ', NOT met'})",
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
        f"- draft settings: {a['settings']}; tokenizer shared: {a['tokenizer']['shared']} ({a['tokenizer']['note']})",
        "- batch 8: transformers assisted generation supports batch size 1 only, so assisted batch 8 is not measured",
        f"- draft training: {result['draft_training'].get('method')}; steps {result['draft_training'].get('steps')}",
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


def _params(result: dict[str, Any], row: dict[str, Any]) -> int:
    if row["model"] == "private":
        return result["private_params"]
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
