"""Timed greedy generation: plain (any batch size) and assisted by a draft model (batch 1 only).

Every row generates exactly `max_new_tokens` tokens (`min_new_tokens` = `max_new_tokens`), so
plain and assisted runs do the same work and tokens/s compare across models and batch sizes.
Each configuration gets one untimed warm-up call first (allocation, kernel selection).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from tools.throughput.metrics import Acceptance, acceptance, make_batches, tokens_per_second

WARMUP_TOKENS = 4
# transformers 5's draft defaults, set explicitly so the report records what ran
DRAFT_DEFAULTS = {"num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
                  "assistant_confidence_threshold": 0.4}


@dataclass
class GenRun:
    """One timed configuration: total new tokens and seconds, and per-prompt outputs at batch 1."""

    batch_size: int
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    acceptance: Acceptance | None = None
    split: dict[str, float] = field(default_factory=dict)  # the own loop: seconds in target / draft forwards

    @property
    def tokens_per_s(self) -> float:
        return tokens_per_second(self.tokens, self.seconds)


def greedy_config(tokenizer, max_new_tokens: int) -> GenerationConfig:
    """Greedy decoding of exactly max_new_tokens tokens, with transformers' default draft settings."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                            eos_token_id=eos, pad_token_id=pad, use_cache=True, **DRAFT_DEFAULTS)


def fixed_draft_length(config: GenerationConfig, gamma: int) -> GenerationConfig:
    """The config drafting exactly `gamma` tokens per step (no confidence cut-off, no schedule)."""
    return GenerationConfig(**{**config.to_dict(), "num_assistant_tokens": gamma,
                               "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0})


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with rows right-aligned, as decoder-only batched generation needs."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def _device(model) -> torch.device:
    return next(model.parameters()).device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_plain(model, prompts: Sequence[Sequence[int]], batch_size: int, config: GenerationConfig,
               progress: Callable[[str], None] | None = None) -> GenRun:
    """Plain greedy generation over all prompts in full batches of batch_size (see make_batches)."""
    device = _device(model)
    pad = config.pad_token_id
    run = GenRun(batch_size)
    batches = make_batches(len(prompts), batch_size)
    warm_ids, warm_mask = left_pad([prompts[i] for i in batches[0]], pad)
    warm = GenerationConfig(**{**config.to_dict(), "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": WARMUP_TOKENS})
    model.generate(input_ids=warm_ids.to(device), attention_mask=warm_mask.to(device), generation_config=warm)
    for k, batch in enumerate(batches):
        ids, mask = left_pad([prompts[i] for i in batch], pad)
        ids, mask = ids.to(device), mask.to(device)
        sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        sync(device)
        run.seconds += time.perf_counter() - start
        new = out[:, ids.shape[1]:].cpu()
        run.tokens += new.numel()
        run.calls += 1
        if batch_size == 1:
            run.outputs.append(new[0].tolist())
        if progress:
            progress(f"batch {k + 1}/{len(batches)}: {run.tokens / run.seconds:.1f} tokens/s so far")
    return run


class _TargetCalls:
    """Records the sequence length of each forward call of the target model (for acceptance)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs) -> None:
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self.lengths.append(int(ids.shape[1]))

    def close(self) -> None:
        self.handle.remove()


DRAFT_KNOBS = ("num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold")


@contextlib.contextmanager
def drafting_as(assistant, config: GenerationConfig) -> Iterator[None]:
    """Apply `config`'s draft knobs to the assistant for the call: transformers reads the draft length,
    its schedule and the confidence cut-off from the *assistant's* generation config, not the target's."""
    saved = assistant.generation_config
    own = copy.deepcopy(saved)
    for knob in DRAFT_KNOBS:
        setattr(own, knob, getattr(config, knob))
    assistant.generation_config = own
    try:
        yield
    finally:
        assistant.generation_config = saved


def time_assisted(model, assistant, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                  tokenizers: tuple | None = None, progress: Callable[[str], None] | None = None) -> GenRun:
    """Greedy generation of `model` drafted by `assistant`, one prompt at a time (transformers' limit),
    with `config`'s draft knobs applied to the assistant (see `drafting_as`).

    `tokenizers=(target, assistant)` switches to universal assisted decoding (different token spaces).
    """
    with drafting_as(assistant, config):
        return _time_assisted(model, assistant, prompts, config, tokenizers, progress)


@torch.no_grad()
def _time_assisted(model, assistant, prompts: Sequence[Sequence[int]], config: GenerationConfig,
                   tokenizers: tuple | None, progress: Callable[[str], None] | None) -> GenRun:
    device = _device(model)
    extra = {} if tokenizers is None else {"tokenizer": tokenizers[0], "assistant_tokenizer": tokenizers[1]}
    run = GenRun(1)
    warm = GenerationConfig(**{**config.to_dict(), "max_new_tokens": WARMUP_TOKENS, "min_new_tokens": WARMUP_TOKENS})
    first = torch.tensor([list(prompts[0])], device=device)
    model.generate(input_ids=first, attention_mask=torch.ones_like(first), generation_config=warm,
                   assistant_model=assistant, **extra)
    total: Acceptance | None = None
    for k, prompt in enumerate(prompts):
        ids = torch.tensor([list(prompt)], device=device)
        calls = _TargetCalls(model)
        try:
            sync(device)
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                 assistant_model=assistant, **extra)
            sync(device)
            run.seconds += time.perf_counter() - start
        finally:
            calls.close()
        new = out[0, ids.shape[1]:].cpu().tolist()
        run.tokens += len(new)
        run.calls += 1
        run.outputs.append(new)
        if tokenizers is None:  # with translation between token spaces the call lengths are not draft counts
            one = acceptance(calls.lengths, ids.shape[1], len(new))
            total = one if total is None else total + one
        if progress:
            progress(f"prompt {k + 1}/{len(prompts)}: {run.tokens / run.seconds:.1f} tokens/s so far")
    run.acceptance = total
    return run


def assistant_settings(config: GenerationConfig) -> dict[str, object]:
    """The draft knobs used (up to 20 draft tokens per step, drafting stops below 0.4 confidence)."""
    return {"num_assistant_tokens": config.num_assistant_tokens,
            "num_assistant_tokens_schedule": config.num_assistant_tokens_schedule,
            "assistant_confidence_threshold": config.assistant_confidence_threshold}
