"""Mutual distillation between a node's private model P and its knowledge messenger M.

Per token over the (shared) vocabulary, with KL(a || b) meaning KL of b from teacher a:

    L_P = CE_P + alpha * KL(sg(q_M) || q_P)      # P learns from the messenger (peers' knowledge)
    L_M = CE_M + alpha * KL(sg(q_P) || q_M)      # M learns from P (this node's knowledge)

sg = stop-gradient, so each loss only moves its own model (papers.md A2, FML / ProxyFL).

The weight: FedKD's adaptive 1 / (CE_P + CE_M) (papers.md A3) was designed for classification
losses near 1; per-token LM losses are 6-8 nats at the start, which switched distillation almost
off (alpha ~0.07). The daemon's default is a fixed alpha = 1 (`[learning] distill_weight =
"fixed"`); "fedkd" keeps FedKD's shape rescaled to 1 at chance level, alpha * 2 ln V / (CE_P +
CE_M), so it still strengthens as both models fit.

P's teacher can be the live, co-trained messenger (it fades what came from other sites within the
round), a frozen snapshot of the merged messenger taken when the round committed (what the mesh
knows, unchanged by local steps), or both. `public_distill_step` lets P learn from that snapshot
on public code every site holds (FedDF / DS-FL), where the teacher's knowledge of other sites'
code shows most. Private model and messenger must share one tokenizer.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fednode.learning.data import TokenDataset
from fednode.learning.device import Placement, backward, finish_step
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


WEIGHTS = ("fixed", "fedkd")
TEACHERS = ("frozen", "live", "both")


def distill_weight(kind: str, alpha: float, ce_p: float, ce_m: float, vocab_size: int) -> float:
    """The KL weight of a step: `alpha` itself ("fixed"), or FedKD's factor rescaled so that it
    equals `alpha` when both models are at chance level (CE = ln V each) and grows as they fit."""
    if kind == "fixed":
        return float(alpha)
    if kind == "fedkd":
        return float(alpha) * 2.0 * math.log(max(vocab_size, 2)) * adaptive_alpha(ce_p, ce_m)
    raise ValueError(f"unknown distillation weight {kind!r}: use one of {', '.join(WEIGHTS)}")


def mutual_losses(
    logits_p: torch.Tensor,
    logits_m: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    alpha: float | None = None,
    temperature: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    pad_id: int | None = None,
    teacher_logits: torch.Tensor | None = None,
    teacher: str = "live",
    weight: str | None = None,
) -> MutualLoss:
    """Both mutual-distillation losses, averaged per predicted token (padding masked).

    alpha=None uses FedKD's raw weight; with `weight` ("fixed"/"fedkd", see distill_weight) alpha
    is the base of that rule. `teacher_logits` (a frozen merged messenger's) teach P when teacher
    is "frozen", or together with the live messenger ("both", the mean of the two KL terms).
    KL terms are scaled by T^2 so their gradient size does not shrink with temperature (Hinton
    et al.); CE always uses T = 1.
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
    kl_live = _masked_mean(token_kl(logits_m[:, :-1], logits_p[:, :-1], temperature), mask) * scale
    if teacher_logits is None or teacher == "live":
        kl_mp = kl_live
    else:
        kl_frozen = _masked_mean(token_kl(teacher_logits[:, :-1], logits_p[:, :-1], temperature), mask) * scale
        kl_mp = kl_frozen if teacher == "frozen" else 0.5 * (kl_frozen + kl_live)
    kl_pm = _masked_mean(token_kl(logits_p[:, :-1], logits_m[:, :-1], temperature), mask) * scale
    ce_p_f, ce_m_f = ce_p.item(), ce_m.item()
    if weight is not None:
        a = distill_weight(weight, 1.0 if alpha is None else alpha, ce_p_f, ce_m_f, logits_p.shape[-1])
    else:
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
    public_steps: int = 0  # steps of P toward the frozen merged messenger on public code
    kl_public: float = 0.0


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
        weight: str | None = None,
        teacher: str = "live",
        placement: Placement | None = None,
    ):
        if teacher not in TEACHERS:
            raise ValueError(f"unknown teacher {teacher!r}: use one of {', '.join(TEACHERS)}")
        self.placement = placement or Placement()
        self.private = self.placement.place(private)
        self.messenger = self.placement.place(messenger)
        self.scaler = self.placement.scaler()
        self.lr_messenger = lr_messenger
        self.weight_decay = weight_decay
        self.alpha = alpha
        self.temperature = temperature
        self.weight = weight
        self.teacher = teacher
        self.frozen = None  # the merged messenger as of the last commit (set_frozen_teacher)
        self.opt_private = torch.optim.AdamW(private.parameters(), lr=lr_private, weight_decay=weight_decay)
        self.opt_messenger = self._new_messenger_optimizer(messenger)

    def _new_messenger_optimizer(self, model) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=self.lr_messenger, weight_decay=self.weight_decay)

    def set_messenger(self, model, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Swap in a new messenger (grown, or replaced by a merge); P and its optimizer are kept.

        Pass the optimizer whose moments growth padded; None starts a fresh AdamW.
        """
        self.messenger = self.placement.place(model, optimizer)
        self.opt_messenger = optimizer if optimizer is not None else self._new_messenger_optimizer(model)

    def set_frozen_teacher(self, model) -> None:
        """Snapshot `model` (the merged messenger) as P's frozen teacher; later steps of the live
        messenger do not change it."""
        frozen = copy.deepcopy(model)
        frozen.eval()
        for param in frozen.parameters():
            param.requires_grad_(False)
        self.frozen = frozen

    def _teacher_logits(self, batch: torch.Tensor) -> torch.Tensor | None:
        if self.frozen is None or self.teacher == "live":
            return None
        with torch.no_grad():
            return self.frozen(input_ids=batch, use_cache=False).logits

    def step(self, batch: torch.Tensor) -> MutualLoss:
        """One optimizer step of both models on one batch of token ids (grad_accum micro-batches;
        the returned losses are the first micro-batch's, what a log needs)."""
        self.private.train()
        self.messenger.train()
        optimizers = [self.opt_private, self.opt_messenger]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        accum, first = self.placement.grad_accum, None
        for part in self.placement.micro_batches(batch):
            with self.placement.autocast():
                logits_p = self.private(input_ids=part, use_cache=False).logits
                logits_m = self.messenger(input_ids=part, use_cache=False).logits
                out = mutual_losses(logits_p, logits_m, part, alpha=self.alpha, temperature=self.temperature,
                                    teacher_logits=self._teacher_logits(part), teacher=self.teacher,
                                    weight=self.weight)
            # the graphs are disjoint (teachers are detached), so one backward fills each model's own grads
            backward((out.loss_p + out.loss_m) / accum, self.scaler)
            first = first or out
        finish_step([list(self.private.parameters()), list(self.messenger.parameters())], optimizers,
                    self.scaler, GRAD_CLIP)
        assert first is not None  # grad_accum >= 1 (config-checked): at least one micro-batch ran
        return first

    def public_distill_step(self, batch: torch.Tensor) -> float:
        """One step of P toward the frozen merged messenger on public code (KL only: P learns what
        the mesh knows, not the public text itself). Returns the KL; 0.0 without a snapshot."""
        if self.frozen is None:
            return 0.0
        self.private.train()
        self.opt_private.zero_grad(set_to_none=True)
        accum, first = self.placement.grad_accum, None
        for part in self.placement.micro_batches(batch):
            with self.placement.autocast():
                logits_p = self.private(input_ids=part, use_cache=False).logits
                with torch.no_grad():
                    logits_t = self.frozen(input_ids=part, use_cache=False).logits
                mask = prediction_mask(part).float()
                kl = _masked_mean(token_kl(logits_t[:, :-1], logits_p[:, :-1], self.temperature), mask)
                loss = kl * self.temperature**2
            backward(loss / accum, self.scaler)
            first = float(loss.detach()) if first is None else first
        finish_step([list(self.private.parameters())], [self.opt_private], self.scaler, GRAD_CLIP)
        return first or 0.0

    def train(
        self,
        dataset: TokenDataset,
        *,
        steps: int,
        batch_size: int,
        seed: int,
        batch_filter: BatchFilter | None = None,
        eval_batch_size: int = 16,
        public_blocks: torch.Tensor | None = None,
        public_steps: int = 0,
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
        public_gen = torch.Generator().manual_seed(seed ^ 0x5EED)
        public_on = public_blocks is not None and public_steps > 0 and self.frozen is not None
        kl_public, done_public = 0.0, 0
        for i in range(steps):
            batch = dataset.train_blocks[pick(batch_size * self.placement.grad_accum, gen)].long()
            out = self.step(batch)
            for key in sums:
                sums[key] += getattr(out, key)
            tokens += batch.numel()
            # public steps spread evenly between the local ones
            for _ in range((public_steps * (i + 1)) // steps - (public_steps * i) // steps if public_on else 0):
                assert public_blocks is not None  # public_on
                rows = torch.randint(public_blocks.shape[0], (batch_size * self.placement.grad_accum,),
                                     generator=public_gen)
                kl_public += self.public_distill_step(public_blocks[rows].long())
                done_public += 1
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
            public_steps=done_public,
            kl_public=kl_public / done_public if done_public else 0.0,
        )
