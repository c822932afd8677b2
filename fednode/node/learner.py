"""The learning side of a round, behind one small interface.

The round state machine only needs: train locally, export what travels, merge what arrived,
and snapshot/restore for checkpoints. `LocalModelLearner` is the plain policy (the whole model
travels, FedAvg merges it); the messenger policies plug in behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fednode.config import Config
from fednode.learning.aggregate import fedavg, validate_update
from fednode.learning.data import TokenDataset
from fednode.learning.models import build_model, family_hash, load_state_tensors, resolve_preset, state_tensors
from fednode.learning.tokenizer import build_tokenizer, tokenizer_hash
from fednode.learning.trainer import LocalTrainer, TrainResult, evaluate


@dataclass(frozen=True)
class LearnerInfo:
    tokenizer_hash: str
    family_hash: str


class Learner(Protocol):
    info: LearnerInfo

    def train_round(self, round_: int) -> TrainResult: ...

    def weight(self) -> float: ...

    def shared_state(self) -> dict[str, torch.Tensor]: ...

    def validate(self, tensors: dict[str, torch.Tensor]) -> None: ...

    def merge(self, contributions: list[tuple[dict[str, torch.Tensor], float]]) -> float: ...

    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...

    def restore(self, tensors: dict[str, torch.Tensor]) -> None: ...


class LocalModelLearner:
    """Trains the site's model on its own data; the whole model is what travels (gossip FedAvg)."""

    def __init__(self, cfg: Config):
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.tokenizer = build_tokenizer(Path(cfg.tokenizer_cache), vocab_size=cfg.model.vocab_size)
        preset = resolve_preset(cfg.model.preset)
        self.model = build_model(preset, self.tokenizer, seed=cfg.model.seed)
        self.dataset = TokenDataset.from_dir(cfg.data.dir, self.tokenizer, seq_len=cfg.data.seq_len,
                                             max_tokens=cfg.data.max_tokens, seed=cfg.model.seed)
        self.trainer = LocalTrainer(self.model, lr=cfg.train.lr, seed=cfg.model.seed)
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer), family_hash(preset))
        self._tokens_last_round = 0

    def train_round(self, round_: int) -> TrainResult:
        result = self.trainer.train(self.dataset, steps=self.cfg.train.steps_per_round,
                                    batch_size=self.cfg.train.batch_size, seed=self.cfg.model.seed * 1_000_003 + round_)
        self._tokens_last_round = result.tokens
        return result

    def weight(self) -> float:
        return float(max(self._tokens_last_round, 1))

    def shared_state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self.model)

    def validate(self, tensors: dict[str, torch.Tensor]) -> None:
        validate_update(tensors, self.shared_state(), max_norm=1e6)

    def merge(self, contributions: list[tuple[dict[str, torch.Tensor], float]]) -> float:
        """FedAvg own state with what arrived; returns the held-out loss after merging."""
        merged = fedavg([(self.shared_state(), self.weight()), *contributions])
        load_state_tensors(self.model, merged)
        return evaluate(self.model, self.dataset.heldout_batches(self.cfg.train.batch_size))

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self.model)

    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        load_state_tensors(self.model, tensors)
