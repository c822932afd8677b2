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
    for run in finite_runs(runs):
        by_arm[run["arm"]].append(run)
    curves = {arm: mean_curve([[p["nll_bpb"] for p in r["rounds"]] for r in rs]) for arm, rs in by_arm.items()}
    # the target: fedavg's best + tolerance where fedavg ran (what a user compares with),
    # else the best any arm reached
    target, set_by = derive_target({"fedavg": curves["fedavg"]} if "fedavg" in curves else curves, tolerance)
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
        ensemble = [_ensemble_to_target(r, target) for r in rs]
        arms[arm] = {
            "rounds_to_target": mean_interval([s["rounds"] for s in per_seed]),
            "bytes_to_target": mean_interval([s["bytes"] for s in per_seed]),
            "wall_s_to_target": mean_interval([s["wall_s"] for s in per_seed]),
            "per_seed": per_seed,
            # the P+M ensemble (scored where the arm has a messenger): what a distilled site can run
            "ensemble_rounds_to_target": mean_interval([e[0] for e in ensemble]),
            "ensemble_bytes_to_target": mean_interval([e[1] for e in ensemble]),
            "final_nll_bpb": _mean([p["nll_bpb"] for p in last]),
            "final_val_loss": _mean([p["val_loss"] for p in last]),
            "final_level": _mean([p["level"] for p in last]),
            "final_nll_m": _mean([p.get("nll_m", math.nan) for p in last]),
            "final_nll_ens": _mean([p.get("nll_ens", math.nan) for p in last]),
            "final_pass1": _mean([p.get("pass1", math.nan) for p in last]),
            "final_nll_per_seed": [r["rounds"][-1]["nll_bpb"] for r in rs if r["rounds"]],
            "bytes_per_round": _mean([p["bytes_per_node"] / p["round"] for p in last]),
            "nll_curve": curves[arm],
            "negotiation": _decision_changes(rs),
            "refusals": _refusals(rs),
        }

    def headline(key: str, adaptive: str = "adaptive", fedavg: str = "fedavg") -> float | None:
        a, f = arms.get(adaptive, {}).get(key, {}), arms.get(fedavg, {}).get(key, {})
        return ratio(a.get("mean"), f.get("mean"))

    # compressed pushes: against the textbook fp32 FedAvg (the target's baseline) and against a
    # FedAvg that compresses too (what compression alone buys either of them)
    compressed = {
        arm: {"rounds_ratio": headline("rounds_to_target", arm), "bytes_ratio": headline("bytes_to_target", arm),
              "bytes_ratio_vs_fedavg_int8": headline("bytes_to_target", arm, "fedavg-int8")}
        for arm in ("adaptive-int8", "prefix-adaptive-int8", "fedavg-int8") if arm in arms}

    # a distilled site may run P+M (two models, ~1.1x P's inference cost): the same ratios for it
    ensemble = {
        arm: {"rounds_ratio": ratio(arms[arm]["ensemble_rounds_to_target"]["mean"],
                                    arms.get("fedavg", {}).get("rounds_to_target", {}).get("mean")),
              "bytes_ratio": ratio(arms[arm]["ensemble_bytes_to_target"]["mean"],
                                   arms.get("fedavg", {}).get("bytes_to_target", {}).get("mean")),
              "seeds_at_target": arms[arm]["ensemble_rounds_to_target"]["n"]}
        for arm in ("adaptive", "adaptive-int8") if arm in arms and arms[arm]["ensemble_rounds_to_target"]["of"]}

    prefix = family_figures(arms, "prefix-")
    if prefix is not None:
        prefix.update(rounds_ratio=headline("rounds_to_target", "prefix-adaptive"),
                      bytes_ratio=headline("bytes_to_target", "prefix-adaptive"))
    return {"target_nll_bpb": target, "target_set_by": set_by, "tolerance": tolerance, "arms": arms,
            "rounds_ratio": headline("rounds_to_target"), "bytes_ratio": headline("bytes_to_target"),
            "wall_ratio": headline("wall_s_to_target"), "at_adaptive_best": _at_adaptive_best(by_arm, curves),
            **(family_figures(arms, "") or {}), "shared_prefix": prefix, "int8": compressed or None,
            "ensemble": ensemble or None}


def _ensemble_to_target(run: dict[str, Any], target: float) -> tuple[float | None, float | None]:
    """(rounds, bytes) at which the run's P+M ensemble first reaches the target, over the rounds
    where it was scored; (None, None) when it never does or was never scored."""
    points = [p for p in run["rounds"] if math.isfinite(p.get("nll_ens", math.nan))]
    if not points:
        return None, None
    curve = [p["nll_ens"] for p in points]
    return (to_target(curve, [p["round"] for p in points], target),
            to_target(curve, [p["bytes_per_node"] for p in points], target))


def _refusals(rs: list[dict[str, Any]]) -> dict[str, int]:
    """Peer inputs the nodes refused, by reason, over all nodes and seeds (an honest mesh: none;
    a LOSS_JUMP or merge-screen refusal here is a default refusing honest work)."""
    out: dict[str, int] = defaultdict(int)
    for r in rs:
        for per_node in (r.get("refusals") or {}).values():
            for reason, n in per_node.items():
                out[reason] += int(n)
    return dict(out)


def _static_levels(arms: dict[str, Any], prefix: str) -> list[int]:
    head = f"{prefix}static-"
    return sorted(int(a[len(head):]) for a in arms if a.startswith(head) and a[len(head):].isdigit())


def family_figures(arms: dict[str, Any], prefix: str) -> dict[str, Any] | None:
    """gain_recovered = (local - adaptive) / (local - fedavg) on final P NLL, and capacity_gain =
    static-smallest - static-largest final P NLL with its 95% interval over the paired seeds
    (None when the family's adaptive arm did not run)."""
    adaptive = arms.get(f"{prefix}adaptive")
    if adaptive is None:
        return None
    local, fedavg = arms.get("local"), arms.get("fedavg")
    gain = None
    if local and fedavg and local["final_nll_bpb"] - fedavg["final_nll_bpb"] != 0:
        gain = (local["final_nll_bpb"] - adaptive["final_nll_bpb"]) / (local["final_nll_bpb"] - fedavg["final_nll_bpb"])
    levels = _static_levels(arms, prefix)
    capacity = None
    if len(levels) >= 2:
        small, large = arms[f"{prefix}static-{levels[0]}"], arms[f"{prefix}static-{levels[-1]}"]
        diffs = [a - b for a, b in zip(small["final_nll_per_seed"], large["final_nll_per_seed"], strict=False)]
        capacity = mean_interval(diffs)
        capacity["smallest"], capacity["largest"] = levels[0], levels[-1]
    return {"gain_recovered": gain, "capacity_gain": capacity["mean"] if capacity else None,
            "capacity_gain_interval": capacity}


def finite_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs as read back from strict JSON, where a NaN (a round not scored) became null: null -> NaN."""
    def fix(point: dict[str, Any]) -> dict[str, Any]:
        return {k: (math.nan if v is None else v) for k, v in point.items()}

    return [{**run, "rounds": [fix(p) for p in run["rounds"]]} for run in runs]


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
    with_pass1 = any(math.isfinite(a.get("final_pass1", math.nan)) for a in summary["arms"].values())
    for arm, a in summary["arms"].items():
        rows.append([arm, _fmt_interval(a["rounds_to_target"]), _fmt_interval(a["bytes_to_target"], MIB, 2),
                     _fmt_interval(a["wall_s_to_target"], 1.0, 0), f"{a['bytes_per_round'] / MIB:.3f}",
                     f"{a['final_nll_bpb']:.4f}", f"{a['final_val_loss']:.4f}", f"{a['final_level']:.1f}"]
                    + ([f"{a.get('final_pass1', math.nan):.3f}"] if with_pass1 else []))
    table = report.markdown_table(
        ["mode", "rounds to target", "MiB sent/node to target", "wall s to target", "MiB/node/round",
         "final NLL (bits/byte)", "final val loss (nats)", "final level"] + (["pass@1 (greedy)"] if with_pass1 else []),
        rows)

    def fmt(x: float | None) -> str:
        return "n/a (a mode did not reach the target)" if x is None else f"{x:.3f}"

    return "\n".join([
        f"# Convergence ({meta.get('preset')})", "",
        f"Command: `{meta.get('command')}`  ", f"Machine: {machine_line(meta.get('machine', {}))}  ",
        f"Date: {meta.get('date_utc')}  ", f"Seeds: {meta.get('seeds')}", "",
        f"Target: HumanEval NLL <= {summary['target_nll_bpb']:.4f} bits/byte (best seed-mean value, reached by "
        f"`{summary['target_set_by']}`, + {summary['tolerance']:.0%}). Intervals: mean [95% t-interval] "
        "(seeds that reached the target / seeds).", "", table, "",
        *_family_lines(summary),
        *_negotiation_lines(summary),
        f"rounds_ratio (adaptive / fedavg) = {fmt(summary['rounds_ratio'])}; "
        f"bytes_ratio = {fmt(summary['bytes_ratio'])}; wall_ratio = {fmt(summary['wall_ratio'])}", "",
        *_secondary_lines(summary.get("at_adaptive_best"))])


def _decision_changes(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first seed's first node: each round where its negotiation decision changed, with the level
    committed then and the mesh JS it saw (did growth come when the plateau and JS signals said so?)."""
    for r in rs:
        decisions = r.get("decisions") or {}
        if not decisions:
            continue
        node = sorted(decisions)[0]
        levels = {p["round"]: p["level"] for p in r["rounds"]}
        out, last = [], None
        for rnd, what, js in decisions[node]:
            if what != last:
                out.append({"seed": r["seed"], "node": node, "round": rnd, "decision": what, "js": js,
                            "level": levels.get(rnd)})
                last = what
        return out
    return []


def _negotiation_lines(summary: dict[str, Any]) -> list[str]:
    out = []
    for arm, a in summary["arms"].items():
        changes = a.get("negotiation") or []
        if not changes:
            continue
        rows = [[c["round"], c["decision"], "-" if c["js"] is None or not math.isfinite(c["js"]) else f"{c['js']:.4g}",
                 "-" if c["level"] is None else f"{c['level']:.1f}"] for c in changes]
        out += [f"Negotiation in `{arm}` (seed {changes[0]['seed']}, {changes[0]['node']}: rounds where the decision "
                "changed):", "", report.markdown_table(["round", "decision", "mesh JS", "level"], rows), ""]
    return out


def _family_lines(summary: dict[str, Any]) -> list[str]:
    """Final P / M / P+M per arm, then each family's gain_recovered and capacity_gain."""
    arms = summary["arms"]
    if not any(math.isfinite(a.get("final_nll_m", math.nan)) for a in arms.values()) and not summary.get(
            "shared_prefix") and summary.get("gain_recovered") is None:
        return []

    def f(x: Any, digits: int = 4) -> str:
        return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"

    rows = [[arm, f(a["final_nll_bpb"]), f(a.get("final_nll_m", math.nan)), f(a.get("final_nll_ens", math.nan))]
            for arm, a in arms.items()]
    out = ["Final HumanEval NLL (bits/byte) of what a site could use:", "",
           report.markdown_table(["mode", "P (private)", "M (merged messenger)", "P+M ensemble"], rows), ""]
    for name, fam in (("distilled", summary), ("shared-prefix", summary.get("shared_prefix") or {})):
        if fam.get("gain_recovered") is None and fam.get("capacity_gain") is None:
            continue
        iv = fam.get("capacity_gain_interval") or {}
        spread = f" [{iv['lo']:.4f}, {iv['hi']:.4f}]" if iv.get("n", 0) > 1 else ""
        out.append(f"{name}: gain_recovered = {f(fam.get('gain_recovered'), 3)}; capacity_gain (static-"
                   f"{iv.get('smallest', '?')} - static-{iv.get('largest', '?')}, final P) = "
                   f"{f(fam.get('capacity_gain'))}{spread}  ")
    refused = {arm: a["refusals"] for arm, a in arms.items() if a.get("refusals")}
    if refused:
        out.append("Peer inputs refused in these honest meshes (all nodes and seeds): " + "; ".join(
            f"{arm}: " + ", ".join(f"{k} {v}" for k, v in sorted(r.items())) for arm, r in refused.items()) + "  ")
    for arm, r in (summary.get("ensemble") or {}).items():
        out.append(f"{arm} scored as its P+M ensemble: rounds_ratio {f(r['rounds_ratio'], 2)}, bytes_ratio "
                   f"{f(r['bytes_ratio'], 2)} vs fp32 fedavg's P ({r['seeds_at_target']} seeds at the target)  ")
    for arm, r in (summary.get("int8") or {}).items():
        out.append(f"{arm} (int8 pushes): rounds_ratio {f(r['rounds_ratio'], 2)}, bytes_ratio {f(r['bytes_ratio'], 2)} "
                   f"vs fp32 fedavg, {f(r['bytes_ratio_vs_fedavg_int8'], 2)} vs int8 fedavg  ")
    return [*out, ""]


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
    for run in finite_runs(runs):
        by_arm[run["arm"]].append(run)

    def series(x: str, y: str, scale: float = 1.0) -> dict[str, tuple[list[float], list[float]]]:
        out_series = {}
        for arm, rs in by_arm.items():
            n = min(len(r["rounds"]) for r in rs)
            xs = [sum(r["rounds"][i][x] for r in rs) / len(rs) / scale for i in range(n)]
            ys = [sum(r["rounds"][i][y] for r in rs) / len(rs) for i in range(n)]
            kept = [(a, b) for a, b in zip(xs, ys, strict=True) if math.isfinite(b)]  # unscored rounds: no point
            out_series[arm] = ([a for a, _ in kept], [b for _, b in kept])
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
