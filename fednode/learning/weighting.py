"""Aggregation weight policies over peers, plus the fairness numbers the round log reports.

Every policy is a pure function returning `{peer: weight}` with weights >= 0 that sum to 1.
Any non-uniform policy changes the point gossip converges to (the network then optimises a
reweighted objective, papers.md 4.6), so the round log should name the policy it used.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping

import torch

from fednode.learning.aggregate import fedavg

DEFAULT_CLIP = 0.5  # nats: caps one peer's measured influence (outliers, a receiver that just diverged)
DEFAULT_MIX = 0.25  # share of uniform weight: every peer keeps >= mix/deg, so the gossip graph stays connected
DEFAULT_DAMPING = 1.0  # delta in 1 + delta*log(1 + tokens)
DEFAULT_EPS = 1e-3  # nats added to every clipped influence, so zero-influence peers are not erased

State = Mapping[str, torch.Tensor]


def _finite(name: str, values: Mapping[str, float]) -> None:
    if not values:
        raise ValueError(f"{name} is empty: need at least one peer")
    for peer, value in values.items():
        try:
            ok = math.isfinite(float(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name}[{peer!r}] is {value!r}: must be a finite number")


def _same_peers(name_a: str, a: Mapping[str, object], name_b: str, b: Mapping[str, object]) -> None:
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        raise ValueError(f"{name_a} and {name_b} name different peers (first difference: {missing[0]!r})")


def normalize(scores: Mapping[str, float]) -> dict[str, float]:
    """Scale non-negative scores to sum 1 (ValueError if any is negative or all are zero)."""
    _finite("scores", scores)
    bad = [p for p, s in scores.items() if s < 0]
    if bad:
        raise ValueError(f"score of peer {bad[0]!r} is negative: weights must be >= 0")
    total = math.fsum(scores.values())
    if total <= 0:
        raise ValueError("all scores are zero: no peer would get weight")
    return {peer: s / total for peer, s in scores.items()}


def uniform(peers: Iterable[str]) -> dict[str, float]:
    """Equal weight for every peer (plain gossip averaging)."""
    peers = list(peers)
    if not peers:
        raise ValueError("peers is empty: need at least one peer")
    if len(set(peers)) != len(peers):
        raise ValueError("peers holds a duplicate id")
    return {peer: 1.0 / len(peers) for peer in peers}


def data_size(token_counts: Mapping[str, int]) -> dict[str, float]:
    """Weight proportional to training tokens (FedAvg's n_i / n)."""
    return normalize({peer: float(n) for peer, n in token_counts.items()})


def fairness_aware(
    influence: Mapping[str, float],
    token_counts: Mapping[str, int],
    *,
    clip: float = DEFAULT_CLIP,
    mix: float = DEFAULT_MIX,
    damping: float = DEFAULT_DAMPING,
    eps: float = DEFAULT_EPS,
) -> dict[str, float]:
    """AFFL's contribution weight as a swappable policy (papers.md A1 step 5 and section 4.6).

    w_j ∝ (clip(phi_j, 0, clip) + eps) / (1 + damping * log(1 + n_j)), then normalised and mixed:
    w = (1 - mix) * w + mix / deg. phi_j is the measured drop of the receiver's held-out loss when
    j's messenger is merged (see `measure_influence`, the cheap local stand-in for a Shapley value);
    the log damping counters the head start big-data peers have (A1's 1/(1 + delta*log|D_j|)).

    Clipping is one-sided, [0, clip] on phi in nats, not symmetric: a harmful merge (phi < 0) can
    only lower a peer to the floor that eps and the uniform mix guarantee. A negative weight would
    leave the convex hull gossip needs to converge, and one noisy measurement on a small buffer
    should not silence a peer. The cap stops one outlier measurement from taking all the weight.
    """
    _finite("influence", influence)
    _finite("token_counts", token_counts)
    _same_peers("influence", influence, "token_counts", token_counts)
    if not clip > 0:
        raise ValueError(f"clip {clip} must be > 0")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix {mix} must lie in [0, 1]")
    if damping < 0 or not eps > 0:
        raise ValueError(f"damping ({damping}) must be >= 0 and eps ({eps}) > 0")
    negative = [p for p, n in token_counts.items() if n < 0]
    if negative:
        raise ValueError(f"token_counts[{negative[0]!r}] is negative")
    scores = {
        peer: (min(max(phi, 0.0), clip) + eps) / (1.0 + damping * math.log1p(token_counts[peer]))
        for peer, phi in influence.items()
    }
    normalized = normalize(scores)
    share = 1.0 / len(normalized)
    return {peer: (1.0 - mix) * w + mix * share for peer, w in normalized.items()}


def q_ffl(losses: Mapping[str, float], q: float, base: Mapping[str, float] | None = None) -> dict[str, float]:
    """q-FFL weights w_j ∝ base_j * loss_j^q (papers.md A11): worse-off peers count more as q grows.

    q = 0 returns base (normalised; uniform when None); large q approaches min-max fairness.
    Computed in log space so large q does not overflow.
    """
    _finite("losses", losses)
    if not math.isfinite(q) or q < 0:
        raise ValueError(f"q {q} must be a finite number >= 0")
    if any(loss < 0 for loss in losses.values()):
        raise ValueError("losses must be >= 0")
    base_w = uniform(losses) if base is None else normalize(base)
    _same_peers("losses", losses, "base", base_w)
    logs = {}
    for peer, loss in losses.items():
        if base_w[peer] == 0 or (loss == 0 and q > 0):
            continue  # zero weight
        logs[peer] = math.log(base_w[peer]) + (q * math.log(loss) if q > 0 else 0.0)
    if not logs:
        raise ValueError("every peer has zero weight: all losses are 0 or every base weight is 0")
    top = max(logs.values())
    return normalize({peer: math.exp(logs[peer] - top) if peer in logs else 0.0 for peer in losses})


def measure_influence(
    receiver_eval: Callable[[dict[str, torch.Tensor]], float],
    own_state: State,
    contributions: Mapping[str, State],
    weights: Mapping[str, float],
    *,
    own_weight: float = 1.0,
) -> dict[str, float]:
    """Leave-one-out influence: loss(merge without j) - loss(merge with all), per peer j.

    Positive means merging j helped the receiver. Merges use aggregate.fedavg with the receiver's
    state first (its shapes win) and `own_weight` for it; weights are relative (fedavg normalises).
    Costs len(contributions) + 1 evaluations.
    """
    if not contributions:
        raise ValueError("contributions is empty: need at least one peer to measure")
    _same_peers("contributions", contributions, "weights", weights)
    peers = sorted(contributions)

    def merged(skip: str | None) -> float:
        parts = [(own_state, own_weight)] + [(contributions[p], weights[p]) for p in peers if p != skip]
        return float(receiver_eval(fedavg(parts)))

    with_all = merged(None)
    return {peer: merged(peer) - with_all for peer in peers}


def state_evaluator(model, batches: list[torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], float]:
    """A receiver_eval for measure_influence: held-out loss of a copy of model loaded with a state."""
    from fednode.learning.models import load_state_tensors
    from fednode.learning.trainer import evaluate

    scratch = copy.deepcopy(model)

    def run(state: dict[str, torch.Tensor]) -> float:
        load_state_tensors(scratch, state)
        return evaluate(scratch, batches)

    return run


def jain_index(values: Iterable[float]) -> float:
    """Jain's index (sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one value holds everything."""
    xs = list(values)
    if not xs:
        raise ValueError("jain_index needs at least one value")
    sq = math.fsum(x * x for x in xs)
    return 1.0 if sq == 0 else math.fsum(xs) ** 2 / (len(xs) * sq)


def gini(values: Iterable[float]) -> float:
    """Gini coefficient of non-negative values (0 = all equal), the mean-absolute-difference form."""
    xs = sorted(values)
    if not xs:
        raise ValueError("gini needs at least one value")
    n, total = len(xs), math.fsum(xs)
    if total == 0:
        return 0.0
    return math.fsum((2 * i - n + 1) * x for i, x in enumerate(xs)) / (n * total)


def fairness_report(per_node_losses: Mapping[str, float]) -> dict[str, float | str]:
    """Spread of per-node held-out loss (lower is better): worst/best node, mean, spread, std, Jain, Gini.

    std is the population std. Jain's index and Gini are taken over the losses themselves, so they
    measure equality of outcomes (Jain 1, Gini 0 = every node equally well off).
    """
    _finite("per_node_losses", per_node_losses)
    losses = list(per_node_losses.values())
    n = len(losses)
    mean = math.fsum(losses) / n
    worst_node = max(per_node_losses, key=lambda p: (per_node_losses[p], p))
    best_node = min(per_node_losses, key=lambda p: (per_node_losses[p], p))
    return {
        "n": n,
        "worst": per_node_losses[worst_node],
        "worst_node": worst_node,
        "best": per_node_losses[best_node],
        "best_node": best_node,
        "mean": mean,
        "spread": per_node_losses[worst_node] - per_node_losses[best_node],
        "std": math.sqrt(math.fsum((x - mean) ** 2 for x in losses) / n),
        "jain": jain_index(losses),
        "gini": gini(losses),
    }
