"""The benchmark's payload (random float32 tensors) and the validations a receiver can run on it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tools.bench_transport.common import MIB, TENSOR_MIB


def make_payload(size_mib: int, *, tensor_mib: int = TENSOR_MIB, seed: int = 0) -> dict[str, Any]:
    """A messenger-like dict of random float32 tensors totalling `size_mib` MiB."""
    import torch

    if size_mib < 1:
        raise ValueError(f"--size-mib must be at least 1, got {size_mib}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    remaining = size_mib * MIB
    index = 0
    while remaining > 0:
        nbytes = min(tensor_mib * MIB, remaining)
        tensors[f"layers.{index:04d}.weight"] = torch.randn(nbytes // 4, generator=generator, dtype=torch.float32)
        remaining -= nbytes
        index += 1
    return tensors


def validate_finite(tensors: dict[str, Any], *_context: Any) -> None:
    """The plain finiteness check: `torch.isfinite(t).all()` on every floating tensor (what
    fednode.learning.aggregate.validate_update did before it went one-pass)."""
    import torch

    from fednode.errors import ProtocolError, Reason

    if not tensors:
        raise ProtocolError(Reason.MALFORMED, "update holds no tensors")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(Reason.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")


def validate_finite_one_pass(tensors: dict[str, Any], *_context: Any) -> None:
    """The same verdict in one pass without temporaries: a finite L2 norm implies every element is
    finite; only a non-finite norm (NaN/Inf, or a float32 overflow) falls back to the exact check
    (the finiteness part of today's validate_update, without its norm bound)."""
    import math

    import torch

    from fednode.errors import ProtocolError, Reason

    if not tensors:
        raise ProtocolError(Reason.MALFORMED, "update holds no tensors")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or math.isfinite(float(torch.linalg.vector_norm(tensor))):
            continue
        if not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(Reason.NOT_FINITE, f"tensor {name!r} holds NaN or Inf")


def validate_like_learner(tensors: dict[str, Any], *_context: Any) -> None:
    """What the daemon's learners run on every update (the default): fednode.learning.aggregate.validate_update,
    which refuses any non-finite tensor and bounds the global L2 norm, against the update's own shapes."""
    from fednode.learning.aggregate import validate_update

    validate_update(tensors, tensors, max_norm=1e6)


# PeerService calls validate(tensors, ...) with whatever else the node passes (e.g. the messenger level)
VALIDATORS: dict[str, Callable[..., None]] = {
    "isfinite": validate_finite, "norm": validate_finite_one_pass, "learner": validate_like_learner}
