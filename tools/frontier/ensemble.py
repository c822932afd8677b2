"""Greedy generation of the P+M ensemble (next-token mixture 1/2 (p_P + p_M)), timed like the others.

transformers' `generate` runs one model; the ensemble a site could serve runs two per token, each
with its own KV cache, so this is a small cached loop over both (left-padded batches, positions
from the attention mask as `generate` computes them).
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence

import torch

from tools.throughput.generation import GenRun, left_pad
from tools.throughput.metrics import make_batches


def _cache_name(model) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns); older ones know only it."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _step(model, ids, mask, positions, cache):
    name = _cache_name(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: cache})
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), getattr(out, name)


@torch.no_grad()
def ensemble_greedy(first, second, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """[batch, new_tokens] greedy tokens of the mixture (no EOS stop: every row gets new_tokens)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    a, cache_a = _step(first, ids, mask, positions, None)
    b, cache_b = _step(second, ids, mask, positions, None)
    out = []
    for step in range(new_tokens):
        token = (torch.logaddexp(a, b) - math.log(2.0)).argmax(-1, keepdim=True)
        out.append(token)
        if step == new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        positions = positions[:, -1:] + 1
        a, cache_a = _step(first, token, mask, positions, cache_a)
        b, cache_b = _step(second, token, mask, positions, cache_b)
    return torch.cat(out, dim=-1)


def time_ensemble(first, second, prompts: Sequence[Sequence[int]], batch_size: int, new_tokens: int,
                  pad_id: int) -> GenRun:
    """Tokens/s of the ensemble over all prompts in full batches (one untimed warm-up batch first)."""
    device = next(first.parameters()).device
    run = GenRun(batch_size)
    batches = make_batches(len(prompts), batch_size)
    warm_ids, warm_mask = left_pad([prompts[i] for i in batches[0]], pad_id)
    ensemble_greedy(first, second, warm_ids.to(device), warm_mask.to(device), 2)
    for batch in batches:
        ids, mask = left_pad([prompts[i] for i in batch], pad_id)
        start = time.perf_counter()
        new = ensemble_greedy(first, second, ids.to(device), mask.to(device), new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        run.seconds += time.perf_counter() - start
        run.tokens += new.numel()
        run.calls += 1
        if batch_size == 1:
            run.outputs.append(new[0].tolist())
    return run
