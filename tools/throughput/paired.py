"""The drafted loop and its baselines timed prompt by prompt in turns, so machine drift hits all alike.

A shared 2-core VM changes speed by 10-30 % over minutes; timing plain decoding over all prompts and
then the drafted loop over all prompts a few minutes later puts that drift into the ratio. Here
every prompt is decoded by each arm in turn (the order reversed on every other prompt: ABC CBA
cancels a linear drift), and the speedups are ratios of the summed times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tools.throughput.generation import GenRun

Arm = Callable[[Sequence[Sequence[int]]], GenRun]  # decodes the prompts it is given, timed


def paired_runs(arms: Mapping[str, Arm], prompts: Sequence[Sequence[int]]) -> dict[str, GenRun]:
    """Each arm over every prompt, in turns; per arm the summed GenRun (tokens, seconds, outputs)."""
    if not arms or not prompts:
        raise ValueError("paired timing needs at least one arm and one prompt")
    names = list(arms)
    total = {name: GenRun(1) for name in names}
    for i, prompt in enumerate(prompts):
        for name in (names if i % 2 == 0 else names[::-1]):
            run = arms[name]([prompt])
            acc = total[name]
            acc.tokens += run.tokens
            acc.seconds += run.seconds
            acc.calls += run.calls
            acc.outputs += run.outputs
    return total


def paired_summary(runs: Mapping[str, GenRun], baseline: str, drafted: str) -> dict[str, Any]:
    """tokens/s per arm, and the drafted arm's speedup over every other arm (identical output checked)."""
    base = runs[baseline]
    out: dict[str, Any] = {"arms": {k: {"tokens_per_s": r.tokens_per_s, "seconds": r.seconds, "tokens": r.tokens}
                                    for k, r in runs.items()}, "prompts": len(base.outputs)}
    d = runs[drafted]
    out["speedup"] = {k: d.tokens_per_s / r.tokens_per_s for k, r in runs.items() if k != drafted and r.tokens_per_s}
    out["identical"] = all(r.outputs == base.outputs for r in runs.values())
    return out
