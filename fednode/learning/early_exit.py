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
"""

from __future__ import annotations

import copy
import time
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
    if not 1 <= layers <= total - extra:
        raise ValueError(f"an early exit after {layers} of {total} layers is outside 1..{total - extra}"
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
               temperature: float = 1.0) -> ExitTraining:
    """Fit the exit toward P on `batches` (token-id tensors); P and the shared layers stay frozen."""
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
    finally:
        for p in shared:
            p.requires_grad_(True)
        draft.eval()
    seconds = time.perf_counter() - start
    kl_after, agree_after = agreement(draft, private, heldout)
    return ExitTraining(steps, tokens, seconds, kl_before, kl_after, agree_before, agree_after)
