"""Fitting an early exit on cached states: P's frozen prefix runs once per sequence, not once per step.

The draft of `early_exit` shares P's first k layers and trains only its exit (a copy of layer k
and/or of the final norm). Those shared layers never change, so their output over a training set
is computed once (`ExitSet.build`), with P's targets beside it; each training step then runs only
the exit and the head. On a 2-core CPU that makes a step ~10x cheaper than a full P + draft
forward, which is what lets the exit see many epochs of self-distillation data (P's own greedy
continuations, as DistillSpec / LayerSkip / Medusa-2 train their drafts) in minutes.

Two losses: `kl` (KL(P || exit) over the head's vocabulary, renormalised) and `top1`
(cross-entropy to P's argmax, which greedy verification accepts). With a subset head the loss
runs over its rows only: a token the head cannot propose is no target (top1) or no mass (kl).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fednode.learning.early_exit import SubsetHead, early_exit_draft, exit_parameters

LOSSES = ("kl", "top1")
IGNORE = -100


def _skeleton(private, layers: list[torch.nn.Module]):
    """A model of P's class running `layers` on given input states (embedding and head replaced by the caller)."""
    config = copy.deepcopy(private.config)
    config.num_hidden_layers = len(layers)
    with torch.device("meta"):
        model = type(private)(config)
    model.model.layers = torch.nn.ModuleList(layers)
    model.model.rotary_emb = private.model.rotary_emb
    return model


def _prefix(private, layers: int):
    """P's embedding and first `layers` layers, no norm: the states the draft's exit receives."""
    prefix = early_exit_draft(private, layers, exit="norm")
    prefix.model.norm = torch.nn.Identity()
    return prefix.model.eval()


def _tail(draft, private, layers: int):
    """The draft's own part: its layers after the shared `layers`, its norm (its head is applied apart)."""
    tail = _skeleton(private, list(draft.model.layers[layers:])).model
    tail.norm = draft.model.norm
    return tail


def _vocab(draft) -> torch.Tensor | None:
    head = draft.lm_head
    return head.index if isinstance(head, SubsetHead) else None


def _head_logits(draft, hidden: torch.Tensor) -> torch.Tensor:
    """Logits over the head's own rows (a subset head's ids in its order, else the whole vocabulary)."""
    head = draft.lm_head
    if isinstance(head, SubsetHead):
        return hidden @ head.rows.T
    return head(hidden)


@dataclass
class ExitSet:
    """Prefix states of token sequences, with P's targets at the positions that count.

    `states` (N, T, H) are P's hidden states after the shared layers; `top1` (N, T) is P's argmax
    as an index into the head's rows (IGNORE where it is not a row or the position does not count);
    `logp` (N, T', V) P's log-probabilities over the rows at the counted positions `start:` (kl only).
    """

    states: torch.Tensor
    top1: torch.Tensor
    logp: torch.Tensor | None
    start: int

    @classmethod
    @torch.no_grad()
    def build(cls, private, draft, layers: int, sequences: torch.Tensor, start: int, loss: str,
              batch: int = 8) -> ExitSet:
        """Run P and its prefix once over `sequences` (N, T); positions >= start - 1 count (they predict start:)."""
        if loss not in LOSSES:
            raise ValueError(f"exit loss {loss!r} is not one of {', '.join(LOSSES)}")
        if not 1 <= start <= sequences.shape[1]:
            raise ValueError(f"the counted positions start at {start}, outside 1..{sequences.shape[1]}")
        prefix = _prefix(private, layers)
        vocab = _vocab(draft)
        first = start - 1
        states, top1, logp = [], [], []
        for chunk in sequences.split(batch):
            states.append(prefix(input_ids=chunk, use_cache=False).last_hidden_state)
            logits = private(input_ids=chunk, use_cache=False).logits[:, first:].float()
            best = logits.argmax(-1)
            rows = logits if vocab is None else logits[..., vocab]
            if vocab is None:
                index = best
            else:
                lookup = torch.full((logits.shape[-1],), IGNORE, dtype=torch.long, device=best.device)
                lookup[vocab] = torch.arange(vocab.numel(), device=best.device)
                index = lookup[best]
            full = torch.full(chunk.shape, IGNORE, dtype=torch.long, device=chunk.device)
            full[:, first:] = index
            top1.append(full)
            if loss == "kl":
                logp.append(F.log_softmax(rows, -1).half())
        return cls(torch.cat(states), torch.cat(top1), torch.cat(logp) if logp else None, first)

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def counted(self) -> int:
        return int((self.top1[:, self.start:] != IGNORE).sum())


@dataclass(frozen=True)
class ExitFit:
    steps: int
    sequences: int
    seconds: float
    loss: str
    lr: float
    agreement_before: float  # top-1 agreement with P on held-out sequences (acceptance at length 1)
    agreement_after: float


@torch.no_grad()
def exit_agreement(draft, private, layers: int, held: ExitSet) -> float:
    """Fraction of counted positions where the draft's argmax (over its head's rows) is P's argmax."""
    tail = _tail(draft, private, layers)
    was = tail.training
    tail.eval()
    logits = _head_logits(draft, tail(inputs_embeds=held.states, use_cache=False).last_hidden_state)
    tail.train(was)
    counted = held.top1 != IGNORE
    return float((logits.argmax(-1) == held.top1)[counted].float().mean()) if counted.any() else 0.0


def fit_exit(draft, private, layers: int, train: ExitSet, held: ExitSet, *, steps: int, batch: int, lr: float,
             seed: int, progress: Callable[[str], None] | None = None) -> ExitFit:
    """Train the draft's exit on `train` for `steps` batches of `batch` sequences; P stays unchanged."""
    params = exit_parameters(draft, private)
    if not params:
        raise ValueError("the draft has no parameters of its own to train")
    loss_kind = "top1" if train.logp is None else "kl"
    tail = _tail(draft, private, layers)
    before = exit_agreement(draft, private, layers, held)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    g = torch.Generator().manual_seed(seed)
    frozen = [p for p in private.parameters() if p.requires_grad]  # a full head is P's own: no gradient
    for p in frozen:
        p.requires_grad_(False)
    start = time.perf_counter()
    tail.train()
    try:
        for step in range(1, steps + 1):
            pick = torch.randint(0, len(train), (min(batch, len(train)),), generator=g)
            hidden = tail(inputs_embeds=train.states[pick], use_cache=False).last_hidden_state
            logits = _head_logits(draft, hidden[:, train.start:]).float()  # the head only where the loss counts
            if train.logp is None:
                labels = train.top1[pick, train.start:].flatten()
                loss = F.cross_entropy(logits.flatten(0, 1), labels, ignore_index=IGNORE)
            else:
                target = train.logp[pick].float()
                kl = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="sum")
                loss = kl / target[..., 0].numel()  # per counted position
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            if progress is not None and step % 50 == 0:
                progress(f"exit fit: step {step}/{steps}, {loss_kind} loss {loss.item():.3f}, held-out agreement "
                         f"{exit_agreement(draft, private, layers, held):.3f}")
                tail.train()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        tail.eval()
        draft.eval()
    seconds = time.perf_counter() - start
    after = exit_agreement(draft, private, layers, held)
    return ExitFit(steps, len(train), seconds, loss_kind, lr, before, after)
