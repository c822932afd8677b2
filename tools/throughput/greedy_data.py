"""Self-distillation data for the early exit: P's own greedy continuations of the site's local code.

A draft is accepted where it predicts what P *generates*, and P's greedy output is not the code it
was trained on (it repeats itself, prefers its own idioms). So the exit learns from sequences whose
second half P wrote: a local-code prompt (the first `prompt_tokens` of a training block, never a
HumanEval prompt: those are the test set) and P's `new_tokens` greedy tokens after it, generated in
batches with EOS masked, as the benchmark generates.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from fednode.learning.data import TokenDataset

PROMPT_TOKENS = 64
NEW_TOKENS = 64
PROMPTS = 96
GEN_BATCH = 32  # P's tokens/s on 2 cores grows ~2x from batch 1 to 32


@dataclass(frozen=True)
class Continuations:
    sequences: torch.Tensor  # (N, prompt + new): prompt, then P's greedy tokens
    prompt_tokens: int
    generated: int  # tokens P generated (N x new)
    seconds: float


@torch.no_grad()
def greedy_continuations(private, data: TokenDataset, *, prompts: int, prompt_tokens: int, new_tokens: int,
                         seed: int, eos: int | None, progress: Callable[[str], None] | None = None
                         ) -> Continuations:
    """P's greedy continuations of `prompts` distinct local-code blocks' first `prompt_tokens` tokens."""
    blocks = data.train_blocks
    if prompt_tokens < 1 or prompt_tokens > blocks.shape[1]:
        raise ValueError(f"a greedy-data prompt of {prompt_tokens} tokens does not fit blocks of {blocks.shape[1]}")
    if not 1 <= prompts <= blocks.shape[0]:
        raise ValueError(f"{prompts} greedy-data prompts asked, the local code has {blocks.shape[0]} blocks")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:prompts]
    device = next(private.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=eos, pad_token_id=eos, use_cache=True)
    out, start = [], time.perf_counter()
    for i in range(0, prompts, GEN_BATCH):
        ids = blocks[order[i:i + GEN_BATCH], :prompt_tokens].to(device)
        out.append(private.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config).cpu())
        if progress is not None:
            done = min(i + GEN_BATCH, prompts)
            rate = done * new_tokens / (time.perf_counter() - start)
            progress(f"greedy data: {done}/{prompts} continuations, {rate:.1f} tokens/s")
    sequences = torch.cat(out)
    return Continuations(sequences, prompt_tokens, prompts * new_tokens, time.perf_counter() - start)
