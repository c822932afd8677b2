"""The draft length, chosen from the draft's own acceptance and cost rather than a constant.

A short assisted run at a fixed length on prompts outside the measured set gives the tokens per
target call, hence Leviathan's per-token acceptance alpha; with the measured cost c (draft tokens/s
over private tokens/s, inverted) `metrics.best_draft_length` picks the length that maximises the
expected speedup. The same two numbers give the bound printed beside the measured speedup.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import GenerationConfig

from tools.throughput import metrics
from tools.throughput.draft_tree import CHAIN, TreeShape
from tools.throughput.speculative import time_drafted

CALIBRATION_LENGTH = 4  # long enough to tell 50 % from 90 % acceptance, short enough to waste little
CALIBRATION_PROMPTS = 2  # HumanEval prompts right after the measured ones (never measured themselves)


def estimate_alpha(acceptance: metrics.Acceptance | None, gamma: int) -> float | None:
    """alpha from an assisted run at constant length gamma (None without acceptance figures)."""
    if acceptance is None or acceptance.tokens_per_target_call is None:
        return None
    tpc = min(max(acceptance.tokens_per_target_call, 1.0), gamma + 1.0)  # the run's last step may be cut short
    return metrics.alpha_from_tokens_per_call(tpc, gamma)


def calibrate(private, draft, prompts: Sequence[Sequence[int]], config: GenerationConfig, cost: float,
              tokenizers: tuple | None = None, loop: str = "transformers",
              verify: Sequence[float] | None = None, shape: TreeShape = CHAIN) -> dict[str, Any]:
    """{'length', 'alpha', 'cost', 'bound', 'expected'}: the length to draft at, from a run at
    CALIBRATION_LENGTH (shorter for a tree, so that its verification was measured). With measured
    verification costs (`verify`, the own loop) the length maximises the speedup expected with them
    (`expected`), else Leviathan's bound. A tree's alpha is its effective per-depth acceptance."""
    per_depth = shape.nodes_per_depth
    probe_length = CALIBRATION_LENGTH if not verify else max(1, min(CALIBRATION_LENGTH, shape.max_length(len(verify))))
    probe = time_drafted(loop, private, draft, prompts, config, probe_length, tokenizers=tokenizers, shape=shape)
    alpha = estimate_alpha(probe.acceptance, probe_length)
    if alpha is None:  # token spaces translated: no acceptance to go by; draft at the calibration length
        return {"length": probe_length, "alpha": None, "cost": cost, "bound": None, "expected": None,
                "prompts": len(prompts)}
    if verify:
        length, expected = metrics.best_draft_length_measured(alpha, cost, verify, per_depth, shape.nodes,
                                                              shape.max_length(len(verify)))
        return {"length": length, "alpha": alpha, "cost": cost, "bound": metrics.speedup_bound(alpha, length, cost),
                "expected": expected, "prompts": len(prompts)}
    length, bound = metrics.best_draft_length(alpha, cost)
    return {"length": length, "alpha": alpha, "cost": cost, "bound": bound, "expected": None,
            "prompts": len(prompts)}
