"""Self-distillation data for the early exit: P's own greedy continuations of the site's local code.

A draft is accepted where it predicts what P *generates*, and P's greedy output is not the code it
was trained on (it repeats itself, prefers its own idioms). So the exit learns from sequences whose
second half P wrote: a local-code prompt (the first `prompt_tokens` of a training block, never a
HumanEval prompt: those are the test set) and P's `new_tokens` greedy tokens after it, generated in
batches with EOS masked, as the benchmark generates.
"""

from __future__ import annotations

import ast
import random
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


FUNCTION_PROMPT_CHARS = (40, 1500)  # a `def` line and its docstring: HumanEval prompts run 100-1,400 chars
FUNCTION_PROMPT_TOKENS = 192


def function_prompts(files: Sequence[Path], count: int, seed: int) -> list[str]:
    """Up to `count` prompts shaped like HumanEval's, cut from the site's code: a function's decorators,
    `def` line and docstring (dedented, so methods count too), shuffled by `seed`. Unparsable files
    are skipped; HumanEval itself is never read (it is the test set)."""
    low, high = FUNCTION_PROMPT_CHARS
    found: list[str] = []
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
                continue
            if ast.get_docstring(node) is None:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            text = textwrap.dedent("".join(lines[first - 1:node.body[0].end_lineno]))
            if low < len(text) < high:
                found.append(text)
    random.Random(seed).shuffle(found)
    return found[:count]


@dataclass(frozen=True)
class Ragged:
    """Prompts of different lengths, each followed by P's greedy tokens: sequences[i][starts[i]:] are P's."""

    sequences: list[list[int]]
    starts: list[int]
    generated: int
    seconds: float


@torch.no_grad()
def greedy_ragged(private, prompts: Sequence[Sequence[int]], *, new_tokens: int, eos: int,
                  progress: Callable[[str], None] | None = None) -> Ragged:
    """P's `new_tokens` greedy tokens after each prompt, in left-padded batches of similar lengths."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("greedy continuations need at least one prompt, none of them empty")
    device = next(private.parameters()).device
    config = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=eos, pad_token_id=eos, use_cache=True)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sequences: list[list[int]] = [[] for _ in prompts]
    start = time.perf_counter()
    for b in range(0, len(order), GEN_BATCH):
        group = order[b:b + GEN_BATCH]
        width = max(len(prompts[i]) for i in group)
        ids = torch.tensor([[eos] * (width - len(prompts[i])) + list(prompts[i]) for i in group], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in group], device=device)
        out = private.generate(input_ids=ids, attention_mask=mask, generation_config=config).cpu()
        for i, row in zip(group, out, strict=True):
            sequences[i] = [*prompts[i], *row[width:].tolist()]
        if progress is not None:
            done = min(b + GEN_BATCH, len(order))
            progress(f"greedy data: {done}/{len(order)} continuations, "
                     f"{done * new_tokens / (time.perf_counter() - start):.1f} tokens/s")
    return Ragged(sequences, [len(p) for p in prompts], len(prompts) * new_tokens, time.perf_counter() - start)
