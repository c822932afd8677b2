"""The human side of a frontier: Markdown tables, one quality-vs-speed plot per batch size, the last line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tools.frontier.analyze import points
from tools.frontier.measure import DEGENERATE
from tools.report import markdown_table, scatter_plot

MODELS = ("P", "M", "P+M", "P<-M")
NAMES = {"P": "P (private)", "M": "M (messenger)", "P+M": "P+M ensemble", "P<-M": "P drafted by M"}


def plot(result: dict[str, Any], batch: int, path: Path) -> Path:
    pts = points(result["rows"], batch)
    groups = {NAMES[m]: [(p.tokens_per_s, p.bpb, float(r["round"])) for r, p in pts if r["model"] == m]
              for m in MODELS}
    front = [(f["tokens_per_s"], f["bpb"]) for f in result["analysis"][str(batch)]["front"]]
    return scatter_plot(path, groups, f"greedy tokens/s at batch {batch}", "HumanEval bits/byte (lower is better)",
                        f"Quality vs speed, {result['preset']} (batch {batch})", "round", front=front, log_x=True)


def _f(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def markdown(result: dict[str, Any], meta: dict[str, Any], plots: dict[int, str]) -> str:
    sizes = result["batch_sizes"]
    lines = [f"# Frontier: {result['preset']}", "", f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date_utc']}; machine: {meta['machine']['cpu']}, "
             f"{meta['machine']['usable_cores']} usable cores; run: `{result['from_run']}`",
             f"- quality: bits/byte on {result['problems']} HumanEval problems; speed: {result['prompts']} prompts x "
             f"{result['max_new_tokens']} new tokens, greedy; node {', '.join(result['nodes'])}, every "
             f"{result['every']} rounds", ""]
    for bs in sizes:
        a = result["analysis"][str(bs)]
        lines += [f"## Batch {bs}", "", f"![frontier batch {bs}]({plots[bs]})", "", "Pareto-optimal points:", "",
                  markdown_table(["point", "bits/byte", "tokens/s"],
                                 [[f["label"], f["bpb"], f["tokens_per_s"]] for f in a["front"]]), ""]
        for family, reach in a.get("reach", {}).items():
            lines.append(f"- {family}: first round reaching {reach['target_area']:.3g} (90 % of the best final "
                         f"dominated area): " + ", ".join(f"{arm} {r if r is not None else 'never'}"
                                                          for arm, r in sorted(reach["first_round"].items())))
        lines.append("")
    lines += ["## Every point", "", markdown_table(
        ["arm", "round", "level", "model", "bits/byte", *[f"tok/s b{bs}" for bs in sizes], "identical", "speedup",
         "alpha", "c", "length", "bound", "P distinct"],
        [[r["arm"], r["round"], r["level"], r["model"], r["bpb"], *[r["tokens_per_s"].get(str(bs)) for bs in sizes],
          r.get("identical", ""), _f(r.get("speedup"), ".2f"), _f(r.get("alpha")), _f(r.get("cost")),
          r.get("draft_length", ""), _f(r.get("bound"), ".2f"), _f(r.get("distinct"), ".2f")]
         for r in result["rows"]]), "",
        f"`P distinct`: distinct tokens / tokens of P's greedy outputs; below {DEGENERATE} P repeats itself "
        "(e.g. only newlines), any draft predicts that, and the drafted speedup says nothing about the draft.", ""]
    return "\n".join(lines)


def summary(result: dict[str, Any], paths: dict[str, Path]) -> dict[str, Any]:
    drafted = [r for r in result["rows"] if r["model"] == "P<-M"]
    best = max(drafted, key=lambda r: r["speedup"], default=None)
    varied = [r for r in drafted if (r.get("distinct") or 0.0) >= DEGENERATE]
    honest = max(varied, key=lambda r: r["speedup"], default=None)
    return {"bench": "frontier", "preset": result["preset"], "points": len(result["rows"]),
            "front_b1": [f["label"] for f in result["analysis"].get("1", {}).get("front", [])],
            "best_draft_speedup": None if best is None else best["speedup"],
            "best_draft": None if best is None else f"{best['arm']} r{best['round']} L{best['level']}",
            "best_draft_speedup_varied_output": None if honest is None else honest["speedup"],
            "best_draft_varied_output": None if honest is None else
            f"{honest['arm']} r{honest['round']} L{honest['level']}",
            "all_drafts_identical": all(r.get("identical") for r in drafted),
            "reach_b1": {f: v["first_round"] for f, v in result["analysis"].get("1", {}).get("reach", {}).items()},
            "report": str(paths["json"])}
