"""From measured rows to the frontier's answers (pure: rows in, dicts out).

A row: {arm, seed, node, round, level, model, bpb, tokens_per_s: {batch: value}, identical?}.
At each batch size: the Pareto-optimal points over every arm and round, the best quality at the
speeds the arms' P reach, and per arm the dominated area round by round (2-D hypervolume below
the worst measured bits/byte), so "did growth move the site along the frontier faster than a
static level" is: which arm's area reaches 90 % of the largest final area first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tools.frontier.pareto import Point, best_at_speed, dominated_area, first_round_reaching, pareto_front

REACH = 0.9  # "along the frontier": 90 % of the best final dominated area


def label(row: dict[str, Any]) -> str:
    return f"{row['arm']} r{row['round']} {row['model']}" + (f" L{row['level']}" if row["model"] != "P" else "")


def points(rows: Sequence[dict[str, Any]], batch: int) -> list[tuple[dict[str, Any], Point]]:
    """(row, point) for every row measured at this batch size (a drafted P only with identical output)."""
    out = []
    for row in rows:
        tps = row["tokens_per_s"].get(str(batch))
        if tps is None or row["bpb"] is None or row.get("identical") is False:
            continue
        out.append((row, Point(label(row), float(row["bpb"]), float(tps))))
    return out


def _family(arm: str) -> str:
    return "shared-prefix" if arm.startswith("prefix-") else "lora" if arm.startswith("lora-") else "distilled"


def analyze(rows: Sequence[dict[str, Any]], batch_sizes: Sequence[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bs in batch_sizes:
        pts = points(rows, bs)
        if not pts:
            out[str(bs)] = {"front": [], "areas": {}, "reach": {}, "best_at_speed": []}
            continue
        worst = max(p.bpb for _, p in pts)
        front = pareto_front([p for _, p in pts])
        by_arm: dict[str, dict[int, list[Point]]] = defaultdict(lambda: defaultdict(list))
        for row, p in pts:
            by_arm[row["arm"]][row["round"]].append(p)
        areas = {arm: {r: dominated_area(ps, worst) for r, ps in sorted(rounds.items())}
                 for arm, rounds in by_arm.items()}
        reach: dict[str, Any] = {}
        for family in sorted({_family(a) for a in areas}):
            arms = [a for a in areas if _family(a) == family]
            best_final = max(areas[a][max(areas[a])] for a in arms)
            target = REACH * best_final
            reach[family] = {"target_area": target,
                             "first_round": {a: first_round_reaching(list(areas[a].items()), target) for a in arms}}
        speeds = sorted({p.tokens_per_s for row, p in pts if row["model"] == "P" and row["round"] == max(
            r["round"] for r, _ in pts if r["arm"] == row["arm"])})
        best = []
        for speed in speeds:
            hit = best_at_speed([p for _, p in pts], speed)
            best.append({"min_tokens_per_s": speed, "best": None if hit is None else hit.label,
                         "bpb": None if hit is None else hit.bpb})
        out[str(bs)] = {"front": [{"label": p.label, "bpb": p.bpb, "tokens_per_s": p.tokens_per_s} for p in front],
                        "worst_bpb": worst, "areas": {a: {str(r): v for r, v in ar.items()} for a, ar in areas.items()},
                        "reach": reach, "best_at_speed": best}
    return out
