"""Aggregation of peer tensors: per-coordinate weighted averaging and update validation.

Peers may hold nested prefixes of one model family (fewer layers, narrower blocks), so
averaging is per coordinate: each coordinate is averaged over the peers that hold it
(the HeteroFL / nested-prefix rule). Pure functions: no I/O, inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from fednode.errors import ProtocolError, Reason

Contribution = tuple[Mapping[str, torch.Tensor], float]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_weights(contributions: Sequence[Contribution]) -> None:
    if not contributions:
        raise ValueError("fedavg needs at least one contribution")
    for i, (_, weight) in enumerate(contributions):
        try:
            value = float(weight)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"contribution {i} has weight {weight!r}: weights must be finite and > 0")


def _prefix(shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(0, s) for s in shape)


def _average_one(name: str, holders: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Average one named tensor; the output has the first holder's shape and dtype.

    Weights are normalised by the largest one in float64 first, so no weight (1e300, 1e-300) can
    overflow the accumulator or make a weight sum 0; the per-coordinate weight sum is float64."""
    first = holders[0][0]
    _check_holders(name, holders)
    acc_dtype = _accum_dtype(first.dtype)
    top = max(w for _, w in holders)
    scaled = [(t, w / top) for t, w in holders]  # in (0, 1], float64 (python floats)
    if all(t.shape == first.shape for t, _ in holders):
        total = math.fsum(w for _, w in scaled)
        acc = torch.zeros(first.shape, dtype=acc_dtype)
        for tensor, weight in scaled:
            acc.add_(tensor.detach().to("cpu", acc_dtype), alpha=weight / total)
        return acc.to(first.dtype)
    acc = torch.zeros(first.shape, dtype=torch.float64)
    wsum = torch.zeros(first.shape, dtype=torch.float64)
    for tensor, weight in scaled:
        overlap = _prefix([min(a, b) for a, b in zip(first.shape, tensor.shape, strict=True)])
        acc[overlap] += tensor.detach().to("cpu", torch.float64)[overlap] * weight
        wsum[overlap] += weight
    # the first holder covers its whole shape with a weight > 0, so wsum > 0 everywhere
    return (acc / wsum).to(first.dtype)


def _check_holders(name: str, holders: list[tuple[torch.Tensor, float]]) -> None:
    first = holders[0][0]
    for tensor, _ in holders:
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}: only floating tensors average")
        if tensor.ndim != first.ndim:
            raise ValueError(f"tensor {name!r} has {tensor.ndim} dims in one contribution, {first.ndim} in another")


def _names(contributions: Sequence[Contribution]) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for tensors, _ in contributions:
        for name in tensors:
            if name not in seen:
                seen.add(name)
                names.append(name)
    return names


def fedavg(contributions: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    """Weighted per-coordinate average of named tensors.

    Each name is averaged over the contributions holding it, with the shape of the first of
    them (put the receiver's own tensors first). Where shapes differ, each coordinate of that
    shape is averaged over the contributions whose tensor covers it (leading-prefix overlap);
    coordinates beyond the output shape are dropped. Weights must be finite and > 0.
    """
    _check_weights(contributions)
    out: dict[str, torch.Tensor] = {}
    for name in _names(contributions):
        holders = [(tensors[name], float(w)) for tensors, w in contributions if name in tensors]
        out[name] = _average_one(name, holders)
    return out


# ---------------------------------------------------------------------------- robust aggregation
#
# Median and trimmed mean follow Flower's FedMedian / FedTrimmedAvg (Yin et al. 2018): per
# coordinate, unweighted (a header weight is a claim; a rank is not), over the contributions that
# hold that coordinate (nested prefixes: a peer at a lower level holds fewer coordinates).

TRIM_FRACTION = 0.2  # trimmed-mean: this share cut from each end, at least one value once 3 hold it


def _stacked(name: str, holders: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(values sorted along dim 0 with NaN for "not held" sorted last, count of holders) per coordinate,
    in float64, in the first holder's shape."""
    first = holders[0]
    _check_holders(name, [(t, 1.0) for t in holders])
    stack = torch.full((len(holders), *first.shape), math.nan, dtype=torch.float64)
    for i, tensor in enumerate(holders):
        overlap = _prefix([min(a, b) for a, b in zip(first.shape, tensor.shape, strict=True)])
        stack[i][overlap] = tensor.detach().to("cpu", torch.float64)[overlap]
    held = ~torch.isnan(stack)
    count = held.sum(dim=0)
    ordered, _ = torch.sort(torch.where(held, stack, math.inf), dim=0)
    return ordered, count


def _order_statistic_mean(ordered: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Mean of the sorted values at ranks low..high-1 (per coordinate; high > low everywhere)."""
    ranks = torch.arange(ordered.shape[0]).reshape(-1, *([1] * (ordered.ndim - 1)))
    keep = (ranks >= low) & (ranks < high)
    total = torch.where(keep, ordered, 0.0).sum(dim=0)
    return total / (high - low)


def median(contributions: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    """Per-coordinate median over the contributions holding each coordinate (the mean of the two
    middle values for an even count); weights are checked but not used."""
    _check_weights(contributions)
    out: dict[str, torch.Tensor] = {}
    for name in _names(contributions):
        holders = [tensors[name] for tensors, _ in contributions if name in tensors]
        ordered, count = _stacked(name, holders)
        out[name] = _order_statistic_mean(ordered, (count - 1) // 2, count // 2 + 1).to(holders[0].dtype)
    return out


def trim_count(count: torch.Tensor | int, fraction: float = TRIM_FRACTION):
    """How many values are cut from each end when `count` contributions hold a coordinate."""
    if isinstance(count, int):
        return 0 if count < 3 else max(1, int(fraction * count))
    return torch.where(count < 3, 0, torch.clamp((fraction * count).floor().long(), min=1))


def trimmed_mean(contributions: Sequence[Contribution], fraction: float = TRIM_FRACTION) -> dict[str, torch.Tensor]:
    """Per-coordinate mean after cutting `trim_count` values from each end (at least one once three
    contributions hold the coordinate, so a single outlier in a small mesh is always cut)."""
    _check_weights(contributions)
    if not 0 <= fraction < 0.5:
        raise ValueError(f"trim fraction {fraction} must be in [0, 0.5)")
    out: dict[str, torch.Tensor] = {}
    for name in _names(contributions):
        holders = [tensors[name] for tensors, _ in contributions if name in tensors]
        ordered, count = _stacked(name, holders)
        cut = trim_count(count, fraction)
        out[name] = _order_statistic_mean(ordered, cut, count - cut).to(holders[0].dtype)
    return out


def update_norm(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None = None,
                *, minus: Mapping[str, torch.Tensor] | None = None) -> float:
    """L2 norm (float64) over the coordinates `tensors` shares with `reference` (all of them when None);
    with `minus`, of the difference tensors - minus on those coordinates."""
    sq = 0.0
    for name, tensor in tensors.items():
        ref = tensor if reference is None else reference.get(name)
        if ref is None or tensor.ndim != ref.ndim:
            continue
        overlap = _prefix([min(a, b) for a, b in zip(tensor.shape, ref.shape, strict=True)])
        value = tensor.detach().to("cpu", torch.float64)[overlap]
        if minus is not None and name in minus:
            other = minus[name]
            if other.ndim != tensor.ndim:
                continue
            both = _prefix([min(a, b) for a, b in zip(value.shape, other.shape, strict=True)])
            value = value[both] - other.detach().to("cpu", torch.float64)[both]
        sq += float(value.pow(2).sum())
    return math.sqrt(sq)


def norm_clip(contributions: Sequence[Contribution], *, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Weighted per-coordinate mean after clipping each peer's difference from the first (own)
    contribution to norm `clip` (default: the median of the peers' difference norms), so one peer
    moves the result at most as far as a typical peer does."""
    _check_weights(contributions)
    own = contributions[0][0]
    distances = [update_norm(t, own, minus=own) for t, _ in contributions[1:]]
    if not distances:
        return fedavg(contributions)
    bound = clip if clip is not None else sorted(distances)[(len(distances) - 1) // 2]
    clipped: list[Contribution] = [contributions[0]]
    for (tensors, weight), distance in zip(contributions[1:], distances, strict=True):
        scale = 1.0 if distance <= bound or distance == 0 else bound / distance
        if scale == 1.0:
            clipped.append((tensors, weight))
            continue
        moved = {}
        for name, tensor in tensors.items():
            base = own.get(name)
            if base is None or base.ndim != tensor.ndim:
                moved[name] = tensor
                continue
            t64 = tensor.detach().to("cpu", torch.float64).clone()
            overlap = _prefix([min(a, b) for a, b in zip(t64.shape, base.shape, strict=True)])
            b64 = base.detach().to("cpu", torch.float64)[overlap]
            t64[overlap] = b64 + (t64[overlap] - b64) * scale
            moved[name] = t64.to(tensor.dtype)
        clipped.append((moved, weight))
    return fedavg(clipped)


AGGREGATORS = {"mean": fedavg, "median": median, "trimmed-mean": trimmed_mean, "norm-clip": norm_clip}


def aggregate(method: str, contributions: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    """Aggregate with `method` ([learning] aggregation); the first contribution is the receiver's own."""
    try:
        fn = AGGREGATORS[method]
    except KeyError:
        raise ValueError(f"unknown aggregation {method!r}: use one of {', '.join(AGGREGATORS)}") from None
    return fn(contributions)


# ---------------------------------------------------------------------------- screening against own state

NORM_RATIO_LIMIT = 4.0  # a peer's state may be at most this many times the receiver's own norm
DRIFT_RATIO_LIMIT = 4.0  # ... and at most this many times one round's honest drift away from it
NORM_FLOOR = 1e-3  # an own state of norm ~0 compares against this instead


class TooFar(ProtocolError):
    """A state refused only for its distance from ours: the sender's, or ours, may be the one off
    (the round loop re-syncs when several peers are all too far, see `catchup.diverged`)."""

    def __init__(self, detail: str):
        super().__init__(Reason.MALFORMED, detail)


def screen(own: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor], *,
           norm_ratio: float = NORM_RATIO_LIMIT, distance_limit: float | None = None) -> None:
    """Refuse (ProtocolError) a peer's state that is far from the receiver's own, on the coordinates
    both hold: NOT_FINITE for NaN/Inf, MALFORMED when its norm exceeds `norm_ratio` x own norm or its
    distance from own exceeds `distance_limit` (see `distance_limit`; None: no distance check, e.g. a
    state fetched to catch up, rounds ahead of ours, checked with a wider `norm_ratio`)."""
    own_norm = max(update_norm(own, tensors), NORM_FLOOR)
    norm = update_norm(tensors, own)
    if not math.isfinite(norm):
        raise ProtocolError(Reason.NOT_FINITE, "state holds NaN or Inf")
    if norm > norm_ratio * own_norm:
        raise ProtocolError(Reason.MALFORMED, f"state norm {norm:.4g} is more than {norm_ratio:g} x this node's "
                                              f"own ({own_norm:.4g})")
    if distance_limit is None:
        return
    distance = update_norm(tensors, own, minus=own)
    if distance > distance_limit:
        raise TooFar(f"state is {distance:.4g} away from this node's own, more than the round's limit "
                     f"{distance_limit:.4g} ({DRIFT_RATIO_LIMIT:g} x one round's drift)")


def distance_limit(own: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor] | None,
                   peers: Sequence[Mapping[str, torch.Tensor]], ratio: float = DRIFT_RATIO_LIMIT) -> float | None:
    """How far a peer's state may be from ours this round: `ratio` x one round's honest drift.

    Honest peers start a round from (nearly) the same merged state and each moves by about one
    round of training, so the scale is the larger of our own drift since `start` (the state we
    trained from) and the lower median of the peers' distances from us (robust to one outlier among
    two or more; it also keeps a node that drifted away during a partition merging back in). The
    state's own norm is no scale: early in training an embedding moves farther than its init norm,
    and a norm-relative bound refused every honest update of a small shared part. None when
    `start` is unknown (no distance check; the norm check and the aggregation still apply)."""
    if start is None:
        return None
    scale = update_norm(own, start, minus=start)
    distances = sorted(d for d in (update_norm(t, own, minus=own) for t in peers) if math.isfinite(d))
    if len(distances) >= 2:
        scale = max(scale, distances[(len(distances) - 1) // 2])
    return ratio * max(scale, NORM_FLOOR)


def check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """ProtocolError(NOT_FINITE) if any floating tensor holds NaN or Inf."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(Reason.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")


def _fits(shape: Sequence[int], ref: Sequence[int]) -> bool:
    return len(shape) == len(ref) and all(0 < s <= r for s, r in zip(shape, ref, strict=True))


def validate_update(
    tensors: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    max_norm: float | None = None,
) -> None:
    """Refuse a peer's tensors unless every one is a finite prefix of a reference tensor.

    Raises ProtocolError with MALFORMED (not a dict of tensors, empty, or global L2 norm above
    max_norm), SHAPE_MISMATCH (unknown name, wrong rank, larger than the reference, dtype
    differs) or NOT_FINITE (NaN/Inf).
    """
    if not isinstance(tensors, Mapping) or not tensors:
        raise ProtocolError(Reason.MALFORMED, "update holds no tensors")
    sq_norm = 0.0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ProtocolError(Reason.MALFORMED, f"entry {name!r} is not a named tensor")
        ref = reference.get(name)
        if ref is None:
            raise ProtocolError(Reason.SHAPE_MISMATCH, f"unknown tensor {name!r}")
        if not _fits(tuple(tensor.shape), tuple(ref.shape)):
            raise ProtocolError(
                Reason.SHAPE_MISMATCH,
                f"tensor {name!r} has shape {tuple(tensor.shape)}, not a prefix of {tuple(ref.shape)}",
            )
        if tensor.dtype != ref.dtype:
            raise ProtocolError(
                Reason.SHAPE_MISMATCH, f"tensor {name!r} has dtype {tensor.dtype}, expected {ref.dtype}"
            )
        if tensor.is_floating_point():
            # one pass: a finite norm implies finite elements; only an overflowing norm needs the
            # exact (4-kernel) isfinite check to tell NaN/Inf from large-but-finite values
            norm = float(torch.linalg.vector_norm(tensor.detach()))
            if not math.isfinite(norm):
                if not bool(torch.isfinite(tensor).all()):
                    raise ProtocolError(Reason.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")
                norm = float(torch.linalg.vector_norm(tensor.detach().double()))
            sq_norm += norm * norm
        elif max_norm is not None:
            sq_norm += float(tensor.detach().double().pow(2).sum())
    if max_norm is not None and math.sqrt(sq_norm) > max_norm:
        raise ProtocolError(Reason.MALFORMED, f"update norm {math.sqrt(sq_norm):.4g} exceeds the limit {max_norm:.4g}")
