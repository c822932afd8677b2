"""Pure decisions of the frontier: which points are Pareto-optimal, and how much they dominate.

Quality is HumanEval bits/byte (lower is better), speed is tokens/s (higher is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Point:
    label: str  # e.g. "prefix-adaptive r10 P<-M3"
    bpb: float
    tokens_per_s: float


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good on both axes and better on one."""
    return (a.bpb <= b.bpb and a.tokens_per_s >= b.tokens_per_s
            and (a.bpb < b.bpb or a.tokens_per_s > b.tokens_per_s))


def pareto_front(points: Sequence[Point]) -> list[Point]:
    """The points no other point dominates, fastest first."""
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (-p.tokens_per_s, p.bpb))


def dominated_area(points: Sequence[Point], worst_bpb: float, slowest: float = 0.0) -> float:
    """Area (bits/byte x tokens/s) the points dominate inside the box up to (worst_bpb, slowest):
    the 2-D hypervolume; it grows when any point gets better or faster, so it ranks sets of models."""
    front = [p for p in pareto_front(points) if p.bpb < worst_bpb and p.tokens_per_s > slowest]
    area, best_bpb = 0.0, worst_bpb
    for p in sorted(front, key=lambda p: -p.tokens_per_s):  # fastest first: each adds a strip below the last
        if p.bpb < best_bpb:
            area += (best_bpb - p.bpb) * (p.tokens_per_s - slowest)
            best_bpb = p.bpb
    return area


def best_at_speed(points: Sequence[Point], min_tokens_per_s: float) -> Point | None:
    """The best-quality point at least this fast (None if none is)."""
    fast = [p for p in points if p.tokens_per_s >= min_tokens_per_s]
    return min(fast, key=lambda p: (p.bpb, -p.tokens_per_s)) if fast else None


def first_round_reaching(areas: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first round whose area is >= target (areas: (round, area), any order)."""
    hits = sorted(r for r, a in areas if a >= target)
    return hits[0] if hits else None
