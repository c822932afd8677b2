"""Completions for HumanEval prompts: greedy or sampled, batched, cut at the Codex stop strings.

The prompt is the raw HumanEval prompt (no chat template), tokenized without special tokens. Each
row stops generating once its new text contains a stop string (or at EOS / max_new_tokens), and
the completion is the new text up to the first stop string.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

STOP_STRINGS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
TAIL_TOKENS = 24  # new tokens decoded per step to look for a stop string (stop strings are short)


def truncate_at_stop(text: str, stop: Sequence[str] = STOP_STRINGS) -> str:
    """text up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


class StopOnStrings(StoppingCriteria):
    """Per-row stop once the generated tail contains a stop string."""

    def __init__(self, tokenizer, prompt_len: int, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.stop = tuple(stop)
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.done is None or self.done.shape[0] != input_ids.shape[0]:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        new = input_ids[:, self.prompt_len :]
        tail = new[:, -TAIL_TOKENS:]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        for row, text in enumerate(texts):
            if not self.done[row] and any(s in text for s in self.stop):
                self.done[row] = True
        return self.done.clone()


def _new_text(tokenizer, prompt_ids: list[int], new_ids: list[int], eos_ids: set[int]) -> str:
    """The text the new tokens add to the prompt (cut at the first EOS).

    Decoded as (prompt + new) minus the decoded prompt, so tokenizers whose decoding depends on
    the preceding tokens (sentencepiece's leading spaces) still give the right text.
    """
    for i, t in enumerate(new_ids):
        if t in eos_ids:
            new_ids = new_ids[:i]
            break
    if not new_ids:
        return ""
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head) :]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def _left_truncate(ids: list[int], keep: int) -> list[int]:
    return ids[-keep:] if len(ids) > keep else ids


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    stop: Sequence[str] = STOP_STRINGS,
    max_context: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[list[str]]:
    """`n_samples` completions per prompt (list per prompt, in prompt order).

    temperature 0 is greedy (then n_samples must be 1: more would be identical copies); otherwise
    nucleus sampling with `top_p`, seeded per batch from `seed` without touching the global RNG.
    A prompt longer than max_context - max_new_tokens (max_context defaults to the model's
    max_position_embeddings) keeps its last tokens.
    """
    if n_samples < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("n_samples, batch_size and max_new_tokens must be at least 1")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and n_samples > 1:
        raise ValueError("greedy decoding (temperature 0) gives identical samples: use n_samples=1 or temperature > 0")
    if max_context is None:
        max_context = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    keep = max_context - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in {max_context} positions")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        pad = 0
    eos_ids = {eos} if eos is not None else set()
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(model_eos, int):
        eos_ids.add(model_eos)
    elif isinstance(model_eos, (list, tuple)):
        eos_ids.update(int(e) for e in model_eos)
    gen_kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": pad}
    if eos_ids:
        gen_kwargs["eos_token_id"] = sorted(eos_ids)
    if temperature > 0:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
    config = GenerationConfig(**gen_kwargs)

    jobs = []
    for i, prompt in enumerate(prompts):
        prompt_ids = _left_truncate(list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), keep)
        jobs.extend((i, prompt_ids) for _ in range(n_samples))
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][1]))  # similar lengths pad less
    out: list[list[str]] = [[] for _ in prompts]
    texts: dict[int, str] = {}
    was_training = model.training
    model.eval()
    n_batches = (len(order) + batch_size - 1) // batch_size
    try:
        for b in range(n_batches):
            chunk = order[b * batch_size : (b + 1) * batch_size]
            rows = [jobs[j][1] for j in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for k, r in enumerate(rows):  # left padding: every row's last prompt token is at the end
                ids[k, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[k, width - len(r) :] = 1
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, width, stop)])
            device = next(model.parameters()).device
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(seed * 100_003 + b)
                seqs = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                    stopping_criteria=criteria,
                ).cpu()
            for k, j in enumerate(chunk):
                texts[j] = truncate_at_stop(_new_text(tokenizer, rows[k], seqs[k, width:].tolist(), eos_ids), stop)
            if progress is not None:
                progress(b + 1, n_batches)
    finally:
        model.train(was_training)
    for j in range(len(jobs)):
        out[jobs[j][0]].append(texts[j])
    return out
