"""Measure which matrix-product layout each decode row count should use (`fednode.learning.decode_linear`).

Every layout is timed on the same cached forwards the speculative loop runs (1..MAX_VERIFY tokens
after a prompt), the fastest per row count is kept, and P runs with that plan for every figure of
the run: plain greedy, the own loop and the drafted loop alike, so the speedup compares like with like.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from fednode.learning.decode_linear import LAYOUTS, LINEAR, choose_layouts, install
from tools.throughput.speculative import MAX_VERIFY

MODES = ("auto", LINEAR)  # auto: measured on a CPU (torch's own on an accelerator); linear: F.linear everywhere


def tune_decode_plan(target: torch.nn.Module, prompt: Sequence[int], rows: int = MAX_VERIFY,
                     reps: int = 7) -> tuple[dict[int, str], dict[int, dict[str, float]]]:
    """(plan, seconds[rows][layout]): each layout timed on cached forwards of 1..rows tokens after
    `prompt` (median of `reps`, the layouts interleaved so that drift in the machine's speed hits them
    alike), the fastest per row count installed in `target` (F.linear unless another wins by the margin)."""
    if len(prompt) <= rows:
        raise ValueError(f"need a prompt longer than {rows} tokens to time forwards after it")
    device = next(target.parameters()).device
    cache = DynamicCache()
    start = len(prompt) - rows
    samples: dict[int, dict[str, list[float]]] = {n: {layout: [] for layout in LAYOUTS} for n in range(1, rows + 1)}
    with torch.no_grad():
        target(input_ids=torch.tensor([list(prompt[:start])], device=device), cache=cache, use_cache=True,
               logits_to_keep=1)
        for _ in range(reps):
            for layout in LAYOUTS:
                install(target, dict.fromkeys(samples, layout))
                for n in samples:
                    ids = torch.tensor([list(prompt[start:start + n])], device=device)
                    began = time.perf_counter()
                    target(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=n)
                    samples[n][layout].append(time.perf_counter() - began)
                    cache.crop(-n)  # back to the prompt: every forward reads the same cache
    times = {n: {layout: statistics.median(v) for layout, v in by.items()} for n, by in samples.items()}
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
