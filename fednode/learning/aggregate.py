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
    """Average one named tensor; the output has the first holder's shape and dtype."""
    first = holders[0][0]
    for tensor, _ in holders:
        if not tensor.is_floating_point():
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}: only floating tensors average")
        if tensor.ndim != first.ndim:
            raise ValueError(f"tensor {name!r} has {tensor.ndim} dims in one contribution, {first.ndim} in another")
    acc_dtype = _accum_dtype(first.dtype)
    if all(t.shape == first.shape for t, _ in holders):
        acc = torch.zeros(first.shape, dtype=acc_dtype)
        for tensor, weight in holders:
            acc.add_(tensor.detach().to("cpu", acc_dtype), alpha=weight)
        return (acc / sum(w for _, w in holders)).to(first.dtype)
    acc = torch.zeros(first.shape, dtype=acc_dtype)
    wsum = torch.zeros(first.shape, dtype=acc_dtype)
    for tensor, weight in holders:
        overlap = _prefix([min(a, b) for a, b in zip(first.shape, tensor.shape, strict=True)])
        acc[overlap] += tensor.detach().to("cpu", acc_dtype)[overlap] * weight
        wsum[overlap] += weight
    # the first holder covers its whole shape, so wsum > 0 everywhere
    return (acc / wsum).to(first.dtype)


def fedavg(contributions: Sequence[Contribution]) -> dict[str, torch.Tensor]:
    """Weighted per-coordinate average of named tensors.

    Each name is averaged over the contributions holding it, with the shape of the first of
    them (put the receiver's own tensors first). Where shapes differ, each coordinate of that
    shape is averaged over the contributions whose tensor covers it (leading-prefix overlap);
    coordinates beyond the output shape are dropped. Weights must be finite and > 0.
    """
    _check_weights(contributions)
    names: list[str] = []
    seen: set[str] = set()
    for tensors, _ in contributions:
        for name in tensors:
            if name not in seen:
                seen.add(name)
                names.append(name)
    out: dict[str, torch.Tensor] = {}
    for name in names:
        holders = [(tensors[name], float(w)) for tensors, w in contributions if name in tensors]
        out[name] = _average_one(name, holders)
    return out


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
