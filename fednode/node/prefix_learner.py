"""The `shared-prefix` learner: P's embedding and first k layers travel; the rest of P stays home.

The messenger is P's own sub-network (fednode.learning.prefix), so the knowledge other sites
send lands in P directly at every merge: no distillation step can lose it. What it reveals is
more than the distilled family does: the shared layers are P's own weights (docs/learning.md).
"""

from __future__ import annotations

import logging
import math

import torch

from fednode.config import Config, Mode, uses_frozen_base
from fednode.errors import ProtocolError, Reason
from fednode.learning import prefix, probe, weighting
from fednode.learning.aggregate import validate_update
from fednode.learning.device import Placement
from fednode.learning.merge import MAX_UPDATE_NORM, Contribution, keep_or_restore, weighted_merge
from fednode.learning.models import load_partial_state, load_state_tensors, state_tensors
from fednode.learning.optim_state import load_optimizer_tensors, optimizer_tensors
from fednode.learning.tokenizer import tokenizer_hash
from fednode.learning.trainer import LocalTrainer, TrainResult, evaluate
from fednode.node.learner import (
    LearnerInfo,
    UpdateSpec,
    family_digest,
    load_private_model,
    model_config_json,
    site_dataset,
    spec_of,
)

log = logging.getLogger(__name__)


class PrefixLearner:
    """Trains P on local data; shares the level's prefix of P and merges peers' prefixes into it."""

    def __init__(self, cfg: Config):
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.mode = cfg.learning.mode
        self.shares = True
        self.private, self.tokenizer, family = load_private_model(cfg)
        self.frozen = uses_frozen_base(cfg)
        parts = [family]
        if self.frozen:  # the public base is never trained, so it stays what every peer holds
            named = dict(self.private.named_parameters())
            for name in prefix.FROZEN:
                if name in named:
                    named[name].requires_grad_(False)
            parts.append(f"frozen-base:{prefix.base_hash(named)}")
        full = state_tensors(self.private)
        self.top_level = prefix.top_level(full, self.frozen)
        self.level = min(cfg.learning.static_level if self.mode is Mode.STATIC else 0, self.top_level)
        self._shapes = {name: tuple(t.shape) for name, t in full.items()}
        self.trainer = LocalTrainer(self.private, lr=cfg.train.lr, seed=cfg.model.seed,
                                    placement=Placement.from_config(cfg))
        self.dataset = site_dataset(cfg, self.tokenizer)
        self.probe = probe.probe_blocks(self.tokenizer)
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer), family_digest("shared-prefix", *parts),
                                model_config_json(self.private))
        self._tokens_last_round = 0
        self.last_shared_loss = math.nan
        sizes = [sum(full[n].numel() * full[n].element_size() for n in self.level_shapes(k))
                 for k in range(self.top_level + 1)]
        log.info("shared-prefix levels 0..%d send %s MiB per push (before update_codec)%s", self.top_level,
                 "/".join(f"{b / 2**20:.1f}" for b in sizes),
                 "; the embedding and head are a frozen base, never sent" if self.frozen else "")

    def train_round(self, round_: int) -> TrainResult:
        result = self.trainer.train(self.dataset, steps=self.cfg.train.steps_per_round,
                                    batch_size=self.cfg.train.batch_size,
                                    seed=self.cfg.model.seed * 1_000_003 + round_,
                                    eval_batch_size=self.cfg.train.batch_size)
        self._tokens_last_round = result.tokens
        return result

    def weight(self) -> float:
        return float(max(self._tokens_last_round, 1))

    def set_level(self, level: int, growth_seed: int) -> None:
        """More or fewer of P's layers travel from now on; P itself is unchanged."""
        self.level = max(0, min(level, self.top_level))

    def level_shapes(self, level: int) -> dict[str, tuple[int, ...]]:
        return {n: self._shapes[n] for n in prefix.level_names(list(self._shapes), level, self.top_level,
                                                                  self.frozen)}

    def shared_state(self) -> dict[str, torch.Tensor]:
        return prefix.slice_prefix(state_tensors(self.private), self.level, self.top_level, self.frozen)

    def validate(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        if not 0 <= level <= self.top_level:
            raise ProtocolError(Reason.BAD_LEVEL, f"level {level} is outside the ladder 0..{self.top_level}")
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != self.level_shapes(level):
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"update is not the level-{level} prefix of the model")
        validate_update(tensors, tensors, max_norm=MAX_UPDATE_NORM)

    def update_spec(self) -> UpdateSpec:
        """The top level is P itself: the limit does not move when the mesh grows."""
        return spec_of(self.level_shapes(self.top_level).values(), self.shared_state())

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float:
        """Per-coordinate average of what every peer shares, written back into P's own prefix."""
        heldout = self.dataset.heldout_batches(self.cfg.train.batch_size)
        own = self.shared_state()
        before = evaluate(self.private, heldout) if contributions else math.nan
        merged = weighted_merge(self.cfg, self.cfg.node.name, own, self.weight(), contributions, peer_losses,
                                lambda: weighting.state_evaluator(self.private, heldout))
        load_partial_state(self.private, {n: merged[n] for n in own})
        self.last_shared_loss = evaluate(self.private, heldout)
        keep_or_restore(before, self.last_shared_loss, self.cfg.learning.merge_loss_jump, contributions,
                        lambda: load_partial_state(self.private, own))
        return self.last_shared_loss

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        """A peer's prefix (catch-up): the part that overlaps ours replaces ours."""
        mine = self.level_shapes(min(level, self.level))
        load_partial_state(self.private, {n: tensors[n] for n in mine if n in tensors})

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        out = {f"private.{k}": v for k, v in state_tensors(self.private).items()}
        out.update(optimizer_tensors("private", self.private, self.trainer.optimizer))
        return out

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.level = max(0, min(int(metadata.get("level", "0")), self.top_level))
        load_state_tensors(self.private, {k[8:]: v for k, v in tensors.items() if k.startswith("private.")})
        load_optimizer_tensors("private", self.private, self.trainer.optimizer, tensors)

    def probe_signature(self) -> bytes:
        return probe.probe_signature(self.private, self.probe).to_bytes()
