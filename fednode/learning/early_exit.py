"""A self-speculative draft: the private model's own first k layers, exiting early through its head.

With the `shared-prefix` family the messenger at level k *is* P's embedding plus its first k
layers, so a draft needs no second model (LayerSkip, Draft&Verify): `early_exit_draft` builds a
model of P's class whose embedding, first k layers, rotary table and head are P's own modules
(shared, not copied: no extra memory, and the draft follows P as it trains). Only the exit is the
draft's own: a copy of P's final norm (`exit="norm"`), or that plus a copy of layer k (`exit="layer"`,
one private layer that learns to finish what the shallow prefix leaves undone). `train_exit` fits
just those parameters by distillation toward P (KL of the draft's next-token distribution to P's);
P itself is never changed, so greedy output verified by P stays P's output.

transformers' assisted generation takes the draft as `assistant_model`; the draft keeps its own
KV cache (the shared layers' keys are recomputed, the cost the measured `c` includes).

The output head is a large part of a shallow draft's cost (SmolLM2-135M: 28M of its 135M
parameters, as much as 8 of its 30 layers, multiplied at every drafted token). `with_subset_head`
gives the draft a head over only the most frequent tokens of the site's code (FR-Spec, Zhao et al.
2025): a draft can then propose only those, which costs acceptance only where P's next token is rare.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXITS = ("norm", "layer")


def _decoder(model):
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "norm"):
        raise ValueError(f"{type(model).__name__} is not a Llama-style causal LM (model.layers, model.norm)")
    return inner


def early_exit_draft(private, layers: int, exit: str = "norm"):
    """A draft over P's first `layers` decoder layers and P's head; eval mode, P's device and dtype."""
    inner = _decoder(private)
    total = len(inner.layers)
    if exit not in EXITS:
        raise ValueError(f"exit {exit!r} is not one of {', '.join(EXITS)}")
    extra = 1 if exit == "layer" else 0
    if not 0 <= layers <= total - extra:  # 0: embedding -> exit -> head (the shared-prefix family's level 0)
        raise ValueError(f"an early exit after {layers} of {total} layers is outside 0..{total - extra}"
                         f"{' (exit = layer copies the next one)' if extra else ''}")
    config = copy.deepcopy(private.config)
    config.num_hidden_layers = layers + extra
    with torch.device("meta"):  # the skeleton's own weights are replaced below: never allocated
        draft = type(private)(config)
    blocks = list(inner.layers[:layers])
    if extra:
        blocks.append(copy.deepcopy(inner.layers[layers]))
        blocks[-1].self_attn.layer_idx = layers  # its own slot in the draft's KV cache
    draft.model.embed_tokens = inner.embed_tokens
    draft.model.layers = torch.nn.ModuleList(blocks)
    draft.model.rotary_emb = inner.rotary_emb
    draft.model.norm = copy.deepcopy(inner.norm)
    draft.lm_head = private.lm_head
    draft.generation_config = copy.deepcopy(private.generation_config)
    return draft.eval()


def exit_parameters(draft, private) -> list[torch.nn.Parameter]:
    """The draft's own parameters (the exit): everything not shared with P."""
    shared = {id(p) for p in private.parameters()}
    return [p for p in draft.parameters() if id(p) not in shared]


class SubsetHead(torch.nn.Module):
    """An output head over `keep` token ids only: full-vocabulary logits, the minimum elsewhere.

    The rows are a copy of the head's (a draft is built from a fixed P; rebuild it after P trains),
    so a forward multiplies by len(keep) rows, not the whole vocabulary. Logits keep the full
    vocabulary width, so assisted generation reads token ids in P's own token space.
    """

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        keep = torch.as_tensor(keep, dtype=torch.long, device=weight.device).unique()
        if keep.numel() == 0 or int(keep.min()) < 0 or int(keep.max()) >= weight.shape[0]:
            raise ValueError(f"a subset head needs token ids in 0..{weight.shape[0] - 1}, got {keep.numel()} ids")
        self.vocab_size = int(weight.shape[0])
        self.index: torch.Tensor
        self.rows: torch.Tensor
        self.register_buffer("index", keep)
        self.register_buffer("rows", weight.detach()[keep].clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        part = hidden @ self.rows.T
        out = part.new_full((*part.shape[:-1], self.vocab_size), torch.finfo(part.dtype).min)
        return out.index_copy_(-1, self.index, part)


def frequent_tokens(blocks: list[torch.Tensor], count: int, always: tuple[int, ...] = ()) -> torch.Tensor:
    """The `count` most frequent token ids in `blocks` (ties: the lower id), plus `always` (e.g. EOS)."""
    if count < 1:
        raise ValueError(f"a subset head needs at least one token, got {count}")
    ids = torch.cat([b.reshape(-1) for b in blocks]) if blocks else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(ids)
    order = torch.sort(counts, descending=True, stable=True).indices[:count]
    chosen = order[counts[order] > 0].tolist()
    return torch.tensor(sorted({*chosen, *always}), dtype=torch.long)


def with_subset_head(draft, keep: torch.Tensor):
    """The draft with its head replaced by a `SubsetHead` over `keep` (in place; returns the draft)."""
    draft.lm_head = SubsetHead(draft.lm_head.weight, keep)
    return draft


def coverage(keep: torch.Tensor, tokens: list[list[int]]) -> float:
    """Fraction of `tokens` (e.g. P's greedy outputs) a subset head can propose at all."""
    flat = [t for row in tokens for t in row]
    kept = set(keep.tolist())
    return sum(t in kept for t in flat) / len(flat) if flat else 0.0


@dataclass(frozen=True)
class ExitTraining:
    steps: int
    tokens: int
    seconds: float
    kl_before: float
    kl_after: float
    agreement_before: float  # top-1 agreement with P on held-out blocks: a proxy of acceptance
    agreement_after: float


@torch.no_grad()
def agreement(draft, private, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(mean KL(P || draft) per token, fraction of positions where both argmaxes agree)."""
    kl, agree, n = 0.0, 0, 0
    for batch in batches:
        p = private(input_ids=batch, use_cache=False).logits.float()
        d = draft(input_ids=batch, use_cache=False).logits.float()
        kl += F.kl_div(F.log_softmax(d, -1), F.log_softmax(p, -1), log_target=True, reduction="sum").item()
        agree += int((p.argmax(-1) == d.argmax(-1)).sum())
        n += batch.numel()
    return kl / max(n, 1), agree / max(n, 1)


def train_exit(draft, private, batches, heldout: list[torch.Tensor], *, lr: float = 1e-3,
               temperature: float = 1.0, progress: Callable[[str], None] | None = None) -> ExitTraining:
    """Fit the exit toward P on `batches` (token-id tensors); P and the shared layers stay frozen."""
    batches = list(batches)
    params = exit_parameters(draft, private)
    if not params:
        raise ValueError("the draft has no parameters of its own to train")
    kl_before, agree_before = agreement(draft, private, heldout)
    shared = [p for p in private.parameters() if p.requires_grad]
    for p in shared:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = tokens = 0
    start = time.perf_counter()
    try:
        draft.train()
        for batch in batches:
            with torch.no_grad():
                target = F.log_softmax(private(input_ids=batch, use_cache=False).logits.float() / temperature, -1)
            logits = draft(input_ids=batch, use_cache=False).logits.float() / temperature
            loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            steps += 1
            tokens += batch.numel()
            if progress is not None and steps % 10 == 0:
                progress(f"exit training: step {steps}/{len(batches)}, KL to P {loss.item() / batch.shape[-1]:.3f} "
                         "nats/token")
    finally:
        for p in shared:
            p.requires_grad_(True)
        draft.eval()
    seconds = time.perf_counter() - start
    kl_after, agree_after = agreement(draft, private, heldout)
    return ExitTraining(steps, tokens, seconds, kl_before, kl_after, agree_before, agree_after)
