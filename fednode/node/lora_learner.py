"""The `lora` learner: a frozen base, a shared LoRA adapter whose rank is the capacity, and an
adapter of the site's own (fednode.learning.lora).

Only the shared adapter's first `lora_ranks[level]` components travel: the base is the public
model every peer holds (its hash is in the family hash the handshake compares) and the private
adapter never leaves. The knowledge other sites send lands in P at every merge, as with a shared
prefix, at a fraction of the bytes (SmolLM2-135M, rank 4: about 0.5 M parameters a push).
"""

from __future__ import annotations

import logging
import math

import torch

from fednode.config import Config, Mode
from fednode.errors import ConfigError, ProtocolError, Reason
from fednode.learning import lora, probe, weighting
from fednode.learning.aggregate import validate_update
from fednode.learning.device import Placement
from fednode.learning.merge import MAX_UPDATE_NORM, Contribution, keep_or_restore, weighted_merge
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


def _peft_available() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError('[learning] family = "lora" needs peft: pip install "fednode[lora]"') from None


class LoraLearner:
    """Trains both adapters on local data; shares the shared adapter's rank prefix, merges peers' into it."""

    def __init__(self, cfg: Config):
        _peft_available()
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.mode = cfg.learning.mode
        self.shares = True
        base, self.tokenizer, family = load_private_model(cfg)
        self.ranks = tuple(cfg.learning.lora_ranks)
        targets = lora.target_modules(base)
        widest = lora.smallest_dim(base, targets)
        if max(self.ranks[-1], cfg.learning.lora_private_rank) > widest:
            raise ConfigError(f"[learning] lora_ranks {list(self.ranks)} / lora_private_rank "
                              f"{cfg.learning.lora_private_rank}: this model's narrowest projection is {widest} "
                              f"wide, so no rank may exceed {widest}: lower the ranks")
        parts = [family, f"base:{lora.base_hash(base)}", f"ranks:{','.join(map(str, self.ranks))}",
                 f"targets:{','.join(targets)}"]
        self.config_json = model_config_json(base)
        self.private = lora.attach(base, self.ranks[-1], cfg.learning.lora_private_rank, cfg.model.seed)
        self.top_level = len(self.ranks) - 1
        self.level = min(cfg.learning.static_level if self.mode is Mode.STATIC else 0, self.top_level)
        self.params = lora.adapter_params(self.private, lora.SHARED)
        self.full_shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        self.trainer = LocalTrainer(self.private, lr=cfg.train.lr, seed=cfg.model.seed,
                                    placement=Placement.from_config(cfg))
        self.mask = lora.RankMask(self.params, self.rank)
        self.growth_seed = 0
        self.dataset = site_dataset(cfg, self.tokenizer)
        self.probe = probe.probe_blocks(self.tokenizer)
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer), family_digest("lora", *parts), self.config_json)
        self._tokens_last_round = 0
        self.last_shared_loss = math.nan
        sizes = [sum(math.prod(s) for s in lora.level_shapes(self.full_shapes, r).values()) * 4 for r in self.ranks]
        log.info("lora levels 0..%d (ranks %s on %s) send %s MiB per push (before update_codec); the base is "
                 "frozen and never sent", self.top_level, "/".join(map(str, self.ranks)), ",".join(targets),
                 "/".join(f"{b / 2**20:.2f}" for b in sizes))

    @property
    def rank(self) -> int:
        return self.ranks[self.level]

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
        """Grow (new components: A from the agreed seed, B = 0, so P is unchanged) or shrink."""
        level = max(0, min(level, self.top_level))
        self.growth_seed = growth_seed
        if level == self.level:
            return
        lora.resize(self.params, self.rank, self.ranks[level], growth_seed, self.trainer.optimizer)
        self.level = level
        self.mask.rank = self.rank

    def level_shapes(self, level: int) -> dict[str, tuple[int, ...]]:
        return lora.level_shapes(self.full_shapes, self.ranks[level])

    def shared_state(self) -> dict[str, torch.Tensor]:
        return {n: t.to("cpu") for n, t in lora.slice_rank(self.params, self.rank).items()}

    def validate(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        if not 0 <= level <= self.top_level:
            raise ProtocolError(Reason.BAD_LEVEL, f"level {level} is outside the ladder 0..{self.top_level}")
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != self.level_shapes(level):
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"update is not the shared adapter at rank {self.ranks[level]}")
        validate_update(tensors, tensors, max_norm=MAX_UPDATE_NORM)

    def update_spec(self) -> UpdateSpec:
        return spec_of(self.level_shapes(self.top_level).values(), self.shared_state())

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float:
        """Per-coordinate average of the shared adapters over the rank each peer holds, into ours."""
        heldout = self.dataset.heldout_batches(self.cfg.train.batch_size)
        own = self.shared_state()
        before = evaluate(self.private, heldout) if contributions else math.nan
        merged = weighted_merge(self.cfg, self.cfg.node.name, own, self.weight(), contributions, peer_losses,
                                lambda: weighting.state_evaluator(self.private, heldout))
        lora.load_rank(self.params, {n: merged[n] for n in own})
        self.last_shared_loss = evaluate(self.private, heldout)
        keep_or_restore(before, self.last_shared_loss, self.cfg.learning.merge_loss_jump, contributions,
                        lambda: lora.load_rank(self.params, own))
        return self.last_shared_loss

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        """A peer's shared adapter (catch-up): the components both hold replace ours."""
        rank = min(self.ranks[max(0, min(level, self.top_level))], self.rank)
        lora.load_rank(self.params, lora.slice_rank(tensors, rank))

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n.removeprefix("base_model.model."): p for n, p in self.private.named_parameters() if p.requires_grad}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Both adapters at their allocated ranks and their Adam moments (the base is rebuilt from
        the preset: the same at every start, its hash in the family hash)."""
        out = {f"private.{n}": p.detach().to("cpu", copy=True) for n, p in self._trainable().items()}
        out.update(optimizer_tensors("private", self.private, self.trainer.optimizer))
        return out

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        self.level = max(0, min(int(metadata.get("level", "0")), self.top_level))
        self.mask.rank = self.rank
        with torch.no_grad():
            for n, p in self._trainable().items():
                saved = tensors.get(f"private.{n}")
                if saved is not None and tuple(saved.shape) == tuple(p.shape):
                    p.copy_(saved.to(p.device, p.dtype))
        load_optimizer_tensors("private", self.private, self.trainer.optimizer, tensors)

    def probe_signature(self) -> bytes:
        return probe.probe_signature(self.private, self.probe).to_bytes()
