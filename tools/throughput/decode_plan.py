"""Measure which matrix-product layout each decode row count should use (`fednode.learning.decode_linear`).

Every layout is timed on the same cached forwards the speculative loop runs (1..MAX_VERIFY tokens
after a prompt), the fastest per row count is kept, and P runs with that plan for every figure of
the run: plain greedy, the own loop and the drafted loop alike, so the speedup compares like with like.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fednode.learning.decode_linear import LAYOUTS, LINEAR, choose_layouts, install
from tools.throughput.speculative import MAX_VERIFY, verify_costs

MODES = ("auto", LINEAR)  # auto: measured on a CPU (torch's own on an accelerator); linear: F.linear everywhere


def tune_decode_plan(target: torch.nn.Module, prompt: Sequence[int], rows: int = MAX_VERIFY,
                     reps: int = 5) -> tuple[dict[int, str], dict[int, dict[str, float]]]:
    """(plan, seconds[rows][layout]): each layout timed on cached forwards of 1..rows tokens, the
    fastest per row count installed in `target` (F.linear unless another wins by the margin)."""
    times: dict[int, dict[str, float]] = {n: {} for n in range(1, rows + 1)}
    for layout in LAYOUTS:
        install(target, dict.fromkeys(times, layout))
        for n, seconds in enumerate(verify_costs(target, prompt, 1.0, rows, reps), 1):
            times[n][layout] = seconds
    plan = choose_layouts(times)
    install(target, plan)
    return plan, times


def decode_layout(mode: str, target: torch.nn.Module, draft, prompt: Sequence[int], device: str) -> dict:
    """Apply `mode` to P (and the same plan to the draft's linears); what was measured and chosen, for the report."""
    if mode not in MODES:
        raise ValueError(f"decode layout {mode!r} is not one of {', '.join(MODES)}")
    if mode == LINEAR or torch.device(device).type != "cpu" or len(prompt) <= MAX_VERIFY:
        note = ("F.linear everywhere" if mode == LINEAR else "torch's own kernels on an accelerator"
                if torch.device(device).type != "cpu" else f"a prompt of {len(prompt)} tokens is too short to time "
                f"{MAX_VERIFY}-token forwards after it: F.linear everywhere")
        return {"mode": mode, "plan": None, "seconds": None, "note": note}
    plan, times = tune_decode_plan(target, prompt)
    if isinstance(draft, torch.nn.Module):
        install(draft, plan)
    return {"mode": mode, "plan": {str(n): v for n, v in plan.items()},
            "seconds": {str(n): v for n, v in times.items()},
            "one_token_gain": times[1][LINEAR] / times[1][plan[1]]}
