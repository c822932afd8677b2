"""Local training: plain causal-LM next-token cross-entropy with AdamW.

One round of local work is `LocalTrainer.train`; it reports held-out loss before and after so
the round log (and weighting policies) can see what the round did. Thread count is the
caller's decision: nothing here calls `torch.set_num_threads`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fednode.learning.data import TokenDataset
from fednode.learning.device import Placement, backward, finish_step

GRAD_CLIP = 1.0  # global-norm clipping keeps the high default lr of tiny models stable


@dataclass
class TrainResult:
    """What one local training call did (seconds counts training steps, not evaluation)."""

    loss_before: float
    loss_after: float
    steps: int
    tokens: int
    seconds: float


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1."""
    shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1]).float()
    shift_labels = input_ids[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, reduction=reduction)


def evaluate(model, batches: Iterable[torch.Tensor]) -> float:
    """Mean token cross-entropy in nats over all predicted tokens of all batches (no grad)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                total += float(causal_lm_loss(logits, batch, reduction="sum"))
                count += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate needs at least one batch with 2 or more tokens")
    return total / count


class LocalTrainer:
    """Holds a model and its AdamW state across rounds."""

    def __init__(self, model, *, lr: float = 3e-3, weight_decay: float = 0.0, seed: int = 0,
                 placement: Placement | None = None):
        self.placement = placement or Placement()
        self.model = self.placement.place(model)
        self.seed = seed
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        self.scaler = self.placement.scaler()

    def train(
        self,
        dataset: TokenDataset,
        *,
        steps: int,
        batch_size: int,
        seed: int,
        eval_batch_size: int = 16,
    ) -> TrainResult:
        """Run `steps` optimizer steps on random training blocks; evaluate held-out around them."""
        heldout = dataset.heldout_batches(eval_batch_size)
        loss_before = evaluate(self.model, heldout)
        self.model.train()
        tokens = 0
        start = time.perf_counter()
        accum = self.placement.grad_accum
        for batch in dataset.train_batches(batch_size * accum, steps, seed):
            self.optimizer.zero_grad(set_to_none=True)
            for part in self.placement.micro_batches(batch):
                with self.placement.autocast():
                    loss = causal_lm_loss(self.model(input_ids=part, use_cache=False).logits, part)
                backward(loss / accum, self.scaler)
            finish_step([list(self.model.parameters())], [self.optimizer], self.scaler, GRAD_CLIP)
            tokens += batch.numel()
        seconds = time.perf_counter() - start
        loss_after = evaluate(self.model, heldout)
        return TrainResult(loss_before, loss_after, steps, tokens, seconds)

    def optimizer_state(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)
