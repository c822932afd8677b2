"""Mutual distillation between a node's private model P and its knowledge messenger M.

Per token over the (shared) vocabulary, with KL(a || b) meaning KL of b from teacher a:

    L_P = CE_P + alpha * KL(sg(q_M) || q_P)      # P learns from the messenger (peers' knowledge)
    L_M = CE_M + alpha * KL(sg(q_P) || q_M)      # M learns from P (this node's knowledge)

sg = stop-gradient, so each loss only moves its own model (papers.md A2, FML / ProxyFL). The
default alpha is FedKD's adaptive weight 1 / (CE_P + CE_M) (papers.md A3): distillation stays
weak while either model is still wrong and strengthens once both fit. Private model and
messenger must share one tokenizer, so their logits index the same vocabulary.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fednode.learning.data import TokenDataset
from fednode.learning.trainer import GRAD_CLIP, causal_lm_loss, evaluate

ALPHA_EPS = 1e-6  # floor of CE_P + CE_M: keeps the adaptive weight finite when both fit perfectly

# (batch_size, generator) -> indices of training blocks; CurriculumSampler is one.
BatchFilter = Callable[[int, torch.Generator], torch.Tensor]


@dataclass
class MutualLoss:
    """Both losses (tensors, for backward) and their detached parts (floats, for logs).

    kl_mp = KL(q_M || q_P) is P's distillation term; kl_pm = KL(q_P || q_M) is M's.
    """

    loss_p: torch.Tensor
    loss_m: torch.Tensor
    ce_p: float
    ce_m: float
    kl_pm: float
    kl_mp: float
    alpha: float
    tokens: int  # predicted positions that counted (padding excluded)


def prediction_mask(
    input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, pad_id: int | None = None
) -> torch.Tensor:
    """[batch, seq-1] bool: position t counts when both its input t and its target t+1 are real tokens.

    A padded target has nothing to predict and a padded context predicts from nothing, so both
    are dropped. With neither attention_mask nor pad_id every position counts.
    """
    if attention_mask is not None:
        keep = attention_mask.bool()
    elif pad_id is not None:
        keep = input_ids != pad_id
    else:
        keep = torch.ones_like(input_ids, dtype=torch.bool)
    return keep[:, :-1] & keep[:, 1:]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per position, [batch, seq]; teacher is detached."""
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)


def adaptive_alpha(ce_p: float, ce_m: float) -> float:
    """FedKD's weight 1 / (CE_P + CE_M) from detached values (floored, so it stays finite)."""
    return 1.0 / max(ce_p + ce_m, ALPHA_EPS)


def mutual_losses(
    logits_p: torch.Tensor,
    logits_m: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    alpha: float | None = None,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
) -> MutualLoss:
    """Both mutual-distillation losses, averaged per predicted token (padding masked).

    alpha=None uses the adaptive weight; a float fixes it. KL terms are scaled by T^2 so their
    gradient size does not shrink with temperature (Hinton et al.); CE always uses T = 1.
    """
    if logits_p.shape != logits_m.shape:
        raise ValueError(
            f"logits shapes differ: private {tuple(logits_p.shape)}, messenger {tuple(logits_m.shape)}: "
            "both models must share one tokenizer and vocabulary size"
        )
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    if alpha is not None and alpha < 0:
        raise ValueError(f"alpha {alpha} must be >= 0 (or None for the adaptive weight)")
    mask = prediction_mask(input_ids, attention_mask=attention_mask, pad_id=pad_id).float()
    tokens = int(mask.sum())
    if tokens == 0:
        raise ValueError("batch has no predicted token: every position is padding")
    batch, seq = input_ids.shape
    ce_p = _masked_mean(causal_lm_loss(logits_p, input_ids, reduction="none").view(batch, seq - 1), mask)
    ce_m = _masked_mean(causal_lm_loss(logits_m, input_ids, reduction="none").view(batch, seq - 1), mask)
    scale = temperature**2
    kl_mp = _masked_mean(token_kl(logits_m[:, :-1], logits_p[:, :-1], temperature), mask) * scale
    kl_pm = _masked_mean(token_kl(logits_p[:, :-1], logits_m[:, :-1], temperature), mask) * scale
    ce_p_f, ce_m_f = ce_p.item(), ce_m.item()
    a = adaptive_alpha(ce_p_f, ce_m_f) if alpha is None else float(alpha)
    return MutualLoss(
        loss_p=ce_p + a * kl_mp,
        loss_m=ce_m + a * kl_pm,
        ce_p=ce_p_f,
        ce_m=ce_m_f,
        kl_pm=kl_pm.item(),
        kl_mp=kl_mp.item(),
        alpha=a,
        tokens=tokens,
    )


@dataclass
class MutualResult:
    """One round of mutual training: per-step averages, work done, held-out loss of both models."""

    ce_p: float
    ce_m: float
    kl_pm: float
    kl_mp: float
    alpha: float
    steps: int
    tokens: int
    seconds: float  # training steps only, not evaluation
    p_loss_before: float
    p_loss_after: float
    m_loss_before: float
    m_loss_after: float


def _uniform_filter(n_blocks: int) -> BatchFilter:
    """Uniform sampling with replacement: the same draws as TokenDataset.train_batches for one seed."""

    def pick(batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(n_blocks, (batch_size,), generator=generator)

    return pick


class MutualTrainer:
    """Private model and messenger, each with its own AdamW, trained together on local data."""

    def __init__(
        self,
        private,
        messenger,
        *,
        lr_private: float = 3e-3,
        lr_messenger: float = 3e-3,
        weight_decay: float = 0.0,
        alpha: float | None = None,
        temperature: float = 1.0,
    ):
        self.private = private
        self.messenger = messenger
        self.lr_messenger = lr_messenger
        self.weight_decay = weight_decay
        self.alpha = alpha
        self.temperature = temperature
        self.opt_private = torch.optim.AdamW(private.parameters(), lr=lr_private, weight_decay=weight_decay)
        self.opt_messenger = self._new_messenger_optimizer(messenger)

    def _new_messenger_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr_messenger, weight_decay=self.weight_decay)

    def set_messenger(self, model, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Swap in a new messenger (grown, or replaced by a merge); P and its optimizer are kept.

        Pass the optimizer whose moments growth padded; None starts a fresh AdamW.
        """
        self.messenger = model
        self.opt_messenger = optimizer if optimizer is not None else self._new_messenger_optimizer(model)

    def step(self, batch: torch.Tensor) -> MutualLoss:
        """One optimizer step of both models on one batch of token ids."""
        self.private.train()
        self.messenger.train()
        logits_p = self.private(input_ids=batch, use_cache=False).logits
        logits_m = self.messenger(input_ids=batch, use_cache=False).logits
        out = mutual_losses(logits_p, logits_m, batch, alpha=self.alpha, temperature=self.temperature)
        self.opt_private.zero_grad(set_to_none=True)
        self.opt_messenger.zero_grad(set_to_none=True)
        # the graphs are disjoint (teachers are detached), so one backward fills each model's own grads
        (out.loss_p + out.loss_m).backward()
        torch.nn.utils.clip_grad_norm_(self.private.parameters(), GRAD_CLIP)
        torch.nn.utils.clip_grad_norm_(self.messenger.parameters(), GRAD_CLIP)
        self.opt_private.step()
        self.opt_messenger.step()
        return out

    def train(
        self,
        dataset: TokenDataset,
        *,
        steps: int,
        batch_size: int,
        seed: int,
        batch_filter: BatchFilter | None = None,
        eval_batch_size: int = 16,
    ) -> MutualResult:
        """Run `steps` mutual steps; evaluate both models on held-out data around them.

        batch_filter picks the training-block indices of each batch from a generator seeded by
        `seed` (the curriculum hooks in here); None samples uniformly.
        """
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
        heldout = dataset.heldout_batches(eval_batch_size)
        p_before, m_before = evaluate(self.private, heldout), evaluate(self.messenger, heldout)
        pick = batch_filter or _uniform_filter(dataset.train_blocks.shape[0])
        gen = torch.Generator().manual_seed(seed)
        sums = dict.fromkeys(("ce_p", "ce_m", "kl_pm", "kl_mp", "alpha"), 0.0)
        tokens = 0
        start = time.perf_counter()
        for _ in range(steps):
            batch = dataset.train_blocks[pick(batch_size, gen)].long()
            out = self.step(batch)
            for key in sums:
                sums[key] += getattr(out, key)
            tokens += batch.numel()
        seconds = time.perf_counter() - start
        means = {key: value / steps for key, value in sums.items()}
        return MutualResult(
            **means,
            steps=steps,
            tokens=tokens,
            seconds=seconds,
            p_loss_before=p_before,
            p_loss_after=evaluate(self.private, heldout),
            m_loss_before=m_before,
            m_loss_after=evaluate(self.messenger, heldout),
        )
