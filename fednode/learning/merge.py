"""The one merge of a round: weights per policy, then aggregation of own state with peers' tensors.

Every learner (whole model, messenger, shared prefix) merges through `weighted_merge`, so robust
aggregation and weight bounds are decided in one place. Pure apart from the evaluator the
fairness policy uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fednode.config import Config
from fednode.errors import ProtocolError, Reason
from fednode.learning import weighting
from fednode.learning.aggregate import aggregate, check_finite


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


MAX_UPDATE_NORM = 1e6
MAX_PLAUSIBLE_LOSS = 50.0  # nats; chance over a 10**21-token vocabulary


class MergeRefused(ProtocolError):
    """The merged state is not fit to commit (e.g. non-finite); the caller keeps its own state.
    `peers` are the contributions that went into it."""

    def __init__(self, reason: int, detail: str, peers: list[str]):
        super().__init__(reason, detail)
        self.peers = peers


def check_loss_jump(before: float, after: float, max_jump: float, peers: list[str]) -> None:
    """Refuse a merge that raised the held-out loss by more than `max_jump` (a fraction of the loss
    before it; 0 = never refuse): a sign-flipped or replaced state that the distance screen let
    through shows up here as a loss near chance. MergeRefused(LOSS_JUMP); the caller restores."""
    if max_jump <= 0 or not math.isfinite(before):
        return
    if not math.isfinite(after) or after > before * (1.0 + max_jump):
        raise MergeRefused(Reason.LOSS_JUMP, f"held-out loss {before:.4f} -> {after:.4f} after merging (more than "
                                             f"+{max_jump:.0%}, [learning] merge_loss_jump): own state kept", peers)


def keep_or_restore(before: float, after: float, max_jump: float, contributions: list[Contribution],
                    restore: Callable[[], None]) -> None:
    """After a merge was loaded: keep it, or put the own state back (`restore`) and raise the
    LOSS_JUMP refusal (check_loss_jump) for the round loop to count."""
    try:
        check_loss_jump(before, after, max_jump, sorted(c.sender for c in contributions))
    except MergeRefused:
        restore()
        raise


def round_weight_cap(cfg: Config) -> float:
    """The most tokens one round can train on: steps_per_round x batch_size x seq_len."""
    t = cfg.train
    return float(max(1, t.steps_per_round) * max(1, t.batch_size) * max(1, cfg.data.seq_len))


def clip_weights(cfg: Config, own_tokens: float, contributions: list[Contribution]) -> list[Contribution]:
    """Header weights are claims: each is clipped to what one round can produce and never above the
    receiver's own (itself at most one round's worth); a non-finite or non-positive one counts as 1."""
    cap = round_weight_cap(cfg)
    own = float(own_tokens) if math.isfinite(float(own_tokens)) else 1.0
    own = min(max(own, 1.0), cap)
    out = []
    for c in contributions:
        w = float(c.weight)
        w = min(max(w, 1.0), own) if math.isfinite(w) else 1.0
        out.append(Contribution(c.sender, c.tensors, w))
    return out


def weighted_merge(cfg: Config, own: str, own_state, own_tokens: float, contributions: list[Contribution],
                   peer_losses: dict[str, float], evaluator_factory) -> dict[str, torch.Tensor]:
    """Own state merged with peers' per [learning] weighting and aggregation (own state first).

    Raises MergeRefused when the result is not finite: the caller must keep its own state."""
    if not contributions:
        return own_state
    contributions = clip_weights(cfg, own_tokens, contributions)
    own_tokens = min(max(float(own_tokens), 1.0), round_weight_cap(cfg)) if math.isfinite(float(own_tokens)) else 1.0
    policy = cfg.learning.weighting
    influence = None
    if policy == "fairness":
        influence = weighting.measure_influence(evaluator_factory(), own_state,
                                                {c.sender: c.tensors for c in contributions},
                                                {c.sender: max(c.weight, 1.0) for c in contributions},
                                                own_weight=max(own_tokens, 1.0))
    # losses are claims too (gossiped): no cross-entropy an honest messenger reports is above this
    peer_losses = {k: min(v, MAX_PLAUSIBLE_LOSS) for k, v in peer_losses.items() if math.isfinite(v) and v >= 0}
    weights = policy_weights(policy, own, contributions, own_tokens, peer_losses, cfg.learning.qffl_q, influence)
    floor = max((w for w in weights.values() if math.isfinite(w) and w > 0), default=1.0) * 1e-12
    safe = {k: (w if math.isfinite(w) and w > floor else floor) for k, w in weights.items()}
    merged = aggregate(cfg.learning.aggregation,
                       [(own_state, safe[own]), *[(c.tensors, safe[c.sender]) for c in contributions]])
    try:
        check_finite(merged)
    except ProtocolError as exc:
        raise MergeRefused(Reason.NOT_FINITE, f"merged state is not finite ({exc.detail}): own state kept",
                           sorted(c.sender for c in contributions)) from None
    return merged
