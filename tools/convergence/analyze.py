"""From raw runs (per arm, seed and round) to the comparison: target, x-to-target, ratios, plots."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from tools import report
from tools.convergence.targets import derive_target, mean_curve, mean_interval, ratio, to_target

MIB = 2**20


def analyze(runs: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """`runs`: [{"arm", "seed", "rounds": [{"round", "nll_bpb", "val_loss", "bytes_per_node", "wall_s",
    "level"}, ...]}]. Returns the target, per-arm figures and the headline ratios."""
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run)
    curves = {arm: mean_curve([[p["nll_bpb"] for p in r["rounds"]] for r in rs]) for arm, rs in by_arm.items()}
    target, set_by = derive_target(curves, tolerance)
    arms: dict[str, Any] = {}
    for arm, rs in by_arm.items():
        per_seed = []
        for r in rs:
            nll = [p["nll_bpb"] for p in r["rounds"]]
            per_seed.append({
                "seed": r["seed"],
                "rounds": to_target(nll, [p["round"] for p in r["rounds"]], target),
                "bytes": to_target(nll, [p["bytes_per_node"] for p in r["rounds"]], target),
                "wall_s": to_target(nll, [p["wall_s"] for p in r["rounds"]], target),
            })
        last = [r["rounds"][-1] for r in rs if r["rounds"]]
        arms[arm] = {
            "rounds_to_target": mean_interval([s["rounds"] for s in per_seed]),
            "bytes_to_target": mean_interval([s["bytes"] for s in per_seed]),
            "wall_s_to_target": mean_interval([s["wall_s"] for s in per_seed]),
            "per_seed": per_seed,
            "final_nll_bpb": _mean([p["nll_bpb"] for p in last]),
            "final_val_loss": _mean([p["val_loss"] for p in last]),
            "final_level": _mean([p["level"] for p in last]),
            "bytes_per_round": _mean([p["bytes_per_node"] / p["round"] for p in last]),
            "nll_curve": curves[arm],
        }

    def headline(key: str) -> float | None:
        a, f = arms.get("adaptive", {}).get(key, {}), arms.get("fedavg", {}).get(key, {})
        return ratio(a.get("mean"), f.get("mean"))

    return {"target_nll_bpb": target, "target_set_by": set_by, "tolerance": tolerance, "arms": arms,
            "rounds_ratio": headline("rounds_to_target"), "bytes_ratio": headline("bytes_to_target"),
            "wall_ratio": headline("wall_s_to_target"), "at_adaptive_best": _at_adaptive_best(by_arm, curves)}


def _at_adaptive_best(by_arm: dict[str, list[dict[str, Any]]], curves: dict[str, list[float]]) -> dict[str, Any] | None:
    """A second, weaker target when the main one is out of adaptive's reach: the best seed-mean NLL
    adaptive itself reached. Every arm's rounds and bytes to that level (seed means of the seeds
    that reached it), and adaptive / fedavg ratios: how the two compare where both got."""
    finite = [v for v in curves.get("adaptive", []) if math.isfinite(v)]
    if not finite:
        return None
    target = min(finite)
    out: dict[str, Any] = {"target_nll_bpb": target, "arms": {}}
    for arm, rs in by_arm.items():
        seeds = [(to_target([p["nll_bpb"] for p in r["rounds"]], [p["round"] for p in r["rounds"]], target),
                  to_target([p["nll_bpb"] for p in r["rounds"]], [p["bytes_per_node"] for p in r["rounds"]], target))
                 for r in rs]
        out["arms"][arm] = {"rounds": mean_interval([s[0] for s in seeds]),
                            "bytes": mean_interval([s[1] for s in seeds])}
    a, f = out["arms"].get("adaptive"), out["arms"].get("fedavg")
    out["rounds_ratio"] = ratio(a["rounds"]["mean"], f["rounds"]["mean"]) if a and f else None
    out["bytes_ratio"] = ratio(a["bytes"]["mean"], f["bytes"]["mean"]) if a and f else None
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt_interval(iv: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if not iv["n"]:
        return f"not reached (0/{iv['of']})"
    mean, lo, hi = (iv[k] / scale for k in ("mean", "lo", "hi"))
    spread = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if iv["n"] > 1 else ""
    return f"{mean:.{digits}f}{spread} ({iv['n']}/{iv['of']})"


def machine_line(m: dict[str, Any]) -> str:
    gpus = ", ".join(str(g) for g in m.get("gpus") or []) or "no GPU"
    return (f"{m.get('cpu', '?')}, {m.get('usable_cores', '?')} cores, {m.get('ram_gib', '?')} GiB RAM, {gpus}, "
            f"load {m.get('load_avg_1m', '?')} at the start")


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    rows = []
    for arm, a in summary["arms"].items():
        rows.append([arm, _fmt_interval(a["rounds_to_target"]), _fmt_interval(a["bytes_to_target"], MIB, 2),
                     _fmt_interval(a["wall_s_to_target"], 1.0, 0), f"{a['bytes_per_round'] / MIB:.3f}",
                     f"{a['final_nll_bpb']:.4f}", f"{a['final_val_loss']:.4f}", f"{a['final_level']:.1f}"])
    table = report.markdown_table(
        ["mode", "rounds to target", "MiB sent/node to target", "wall s to target", "MiB/node/round",
         "final NLL (bits/byte)", "final val loss (nats)", "final level"], rows)

    def fmt(x: float | None) -> str:
        return "n/a (a mode did not reach the target)" if x is None else f"{x:.3f}"

    return "\n".join([
        f"# Convergence ({meta.get('preset')})", "",
        f"Command: `{meta.get('command')}`  ", f"Machine: {machine_line(meta.get('machine', {}))}  ",
        f"Date: {meta.get('date_utc')}  ", f"Seeds: {meta.get('seeds')}", "",
        f"Target: HumanEval NLL <= {summary['target_nll_bpb']:.4f} bits/byte (best seed-mean value, reached by "
        f"`{summary['target_set_by']}`, + {summary['tolerance']:.0%}). Intervals: mean [95% t-interval] "
        "(seeds that reached the target / seeds).", "", table, "",
        f"rounds_ratio (adaptive / fedavg) = {fmt(summary['rounds_ratio'])}; "
        f"bytes_ratio = {fmt(summary['bytes_ratio'])}; wall_ratio = {fmt(summary['wall_ratio'])}", "",
        *_secondary_lines(summary.get("at_adaptive_best"))])


def _secondary_lines(sec: dict[str, Any] | None) -> list[str]:
    if not sec:
        return []
    rows = [[arm, _fmt_interval(a["rounds"]), _fmt_interval(a["bytes"], MIB, 2)] for arm, a in sec["arms"].items()]

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return [f"At the best NLL adaptive reached ({sec['target_nll_bpb']:.4f} bits/byte, a weaker target):", "",
            report.markdown_table(["mode", "rounds to it", "MiB sent/node to it"], rows), "",
            f"adaptive / fedavg there: rounds {fmt(sec['rounds_ratio'])}, bytes {fmt(sec['bytes_ratio'])}", ""]


def plots(runs: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> list[Path]:
    by_arm: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        by_arm[run["arm"]].append(run)

    def series(x: str, y: str, scale: float = 1.0) -> dict[str, tuple[list[float], list[float]]]:
        out_series = {}
        for arm, rs in by_arm.items():
            n = min(len(r["rounds"]) for r in rs)
            xs = [sum(r["rounds"][i][x] for r in rs) / len(rs) / scale for i in range(n)]
            ys = [sum(r["rounds"][i][y] for r in rs) / len(rs) for i in range(n)]
            out_series[arm] = (xs, ys)
        return out_series

    return [
        report.line_plot(out / "nll_vs_rounds.png", series("round", "nll_bpb"), "round",
                         "HumanEval NLL (bits/byte)", f"NLL vs rounds (target {summary['target_nll_bpb']:.3f})"),
        report.line_plot(out / "nll_vs_bytes.png", series("bytes_per_node", "nll_bpb", MIB), "MiB sent per node",
                         "HumanEval NLL (bits/byte)", "NLL vs bytes sent"),
        report.line_plot(out / "level_vs_rounds.png", series("round", "level"), "round", "messenger level",
                         "Messenger level vs rounds"),
        report.line_plot(out / "val_loss_vs_rounds.png", series("round", "val_loss"), "round",
                         "held-out loss (nats/token)", "Validation loss vs rounds"),
    ]
