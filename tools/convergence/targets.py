"""Pure decisions of the convergence benchmark: the target, the x-to-target figures, intervals.

The target is taken from the run itself (no magic constant from elsewhere): the best HumanEval
NLL (bits/byte, lower is better) that any mode's seed-mean curve reached, relaxed by a tolerance
(default 2%). A curve reaches the target at the first round whose value is at or below it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

# two-sided 95% Student t quantiles by degrees of freedom (n - 1); beyond 30 the normal 1.96
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def derive_target(curves: Mapping[str, Sequence[float]], tolerance: float = 0.02) -> tuple[float, str]:
    """(target, mode that set it): the lowest finite value over every curve, times (1 + tolerance)."""
    if not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")
    best, best_mode = math.inf, ""
    for mode, curve in curves.items():
        for value in curve:
            if math.isfinite(value) and value < best:
                best, best_mode = value, mode
    if not math.isfinite(best):
        raise ValueError("no finite value in any curve: nothing converged to derive a target from")
    return best * (1 + tolerance), best_mode


def first_reaching(curve: Sequence[float], target: float) -> int | None:
    """Index of the first value <= target (None if the curve never reaches it)."""
    for i, value in enumerate(curve):
        if math.isfinite(value) and value <= target:
            return i
    return None


def to_target(curve: Sequence[float], costs: Sequence[float], target: float) -> float | None:
    """The cumulative cost (rounds, bytes or seconds, aligned with the curve) at which the curve
    first reaches the target; None when it never does."""
    if len(curve) != len(costs):
        raise ValueError(f"curve has {len(curve)} points but costs has {len(costs)}")
    i = first_reaching(curve, target)
    return None if i is None else float(costs[i])


def mean_interval(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean and a 95% t-interval over the seeds that reached the target (`n` says how many)."""
    got = [float(v) for v in values if v is not None and math.isfinite(v)]
    out: dict[str, float | int | None] = {"n": len(got), "of": len(values), "mean": None, "lo": None, "hi": None}
    if not got:
        return out
    mean = statistics.fmean(got)
    half = 0.0
    if len(got) > 1:
        df = len(got) - 1
        t = _T95.get(df) or next((v for k, v in sorted(_T95.items()) if k >= df), 1.96)
        half = t * statistics.stdev(got) / math.sqrt(len(got))
    out.update(mean=mean, lo=mean - half, hi=mean + half)
    return out


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def mean_curve(curves: Sequence[Sequence[float]]) -> list[float]:
    """Pointwise mean over seeds, cut to the shortest curve (every seed must have each point)."""
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]
