"""Where a site trains and in what precision: `[train] device`, `precision`, `grad_accum`.

One `Placement` per learner, passed to its trainers (no process-wide setting): several nodes in one
process (the simulation harness, the tests) may each train on their own device. Mixed precision is
torch's own autocast and GradScaler, the primitives accelerate wraps; accelerate's Accelerator keeps
one AcceleratorState per process, which several nodes in one process cannot share.

What travels and what is checkpointed stays float32 on the CPU (`state_tensors` copies), so a GPU
site and a CPU site merge the same tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fednode.config import PRECISIONS, Config
from fednode.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ConfigError):
    """A device or precision this machine cannot give; the message names the fix."""


def resolve_device(spec: str) -> torch.device:
    """auto: the first CUDA GPU, else the CPU (Apple's MPS only when asked for: some ops the
    models use fall back or fail there). An explicit device must exist."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise DeviceError('[train] device "mps" is not available on this machine: use "cpu" or "auto"')
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = 0
        if spec != "cuda":
            try:
                index = int(spec[5:])
            except ValueError:
                raise DeviceError(f'[train] device {spec!r} is not a device: use "cuda" or "cuda:N" '
                                  f"(N a GPU index)") from None
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index < 0 or index >= count:
            raise DeviceError(f"[train] device {spec!r} is not available: this machine has {count} CUDA "
                              f'device(s) (torch {torch.__version__}); use "auto" or "cpu"')
        return torch.device("cuda", index)
    raise DeviceError(f"[train] device {spec!r} is unknown: use one of {', '.join(DEVICES)}")


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


@dataclass(frozen=True)
class Placement:
    """A learner's device, precision and gradient accumulation (micro-batches per optimizer step)."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise DeviceError(f"[train] precision {self.precision!r} is unknown: use one of {', '.join(PRECISIONS)}")
        if self.grad_accum < 1:
            raise DeviceError(f"[train] grad_accum {self.grad_accum} must be >= 1")
        if self.precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError(f'[train] precision "bf16" is not supported by {self.device}: use "fp16" or "fp32"')

    @classmethod
    def of(cls, device: str = "cpu", precision: str = "fp32", grad_accum: int = 1) -> Placement:
        return cls(resolve_device(device), precision, grad_accum)

    @classmethod
    def from_config(cls, cfg: Config) -> Placement:
        """[train] device, precision, grad_accum; DeviceError (one line) when this machine lacks them."""
        return cls.of(cfg.train.device, cfg.train.precision, cfg.train.grad_accum)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward passes of a training step: autocast to bf16/fp16, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs its gradients scaled (they underflow otherwise); bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def to(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, non_blocking=True)

    def place(self, model, optimizer: torch.optim.Optimizer | None = None, device: torch.device | None = None):
        """Move `model` (parameters keep their identity, so optimizers stay valid) and `optimizer`'s
        state to `device` (default: ours). Returns the model."""
        target = device or self.device
        model.to(target)
        if optimizer is not None:
            for state in optimizer.state.values():
                for key, value in list(state.items()):
                    if torch.is_tensor(value) and key != "step":
                        state[key] = value.to(target)
        return model

    def micro_batches(self, batch: torch.Tensor) -> Iterator[torch.Tensor]:
        """`batch` (grad_accum x batch_size rows) as grad_accum micro-batches on our device."""
        for part in batch.chunk(self.grad_accum):
            yield self.to(part)


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    """One micro-batch's backward (its loss already divided by the accumulation count)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def finish_step(params: list[list[torch.nn.Parameter]], optimizers: list[torch.optim.Optimizer],
                scaler: torch.amp.GradScaler | None, clip: float) -> None:
    """Clip and step each optimizer once after the micro-batches' backwards; with a scaler (fp16),
    unscale before clipping, skip a step whose gradients overflowed, and update the scale after."""
    for group, opt in zip(params, optimizers, strict=True):
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(group, clip)
    for opt in optimizers:
        if scaler is not None:
            scaler.step(opt)
        else:
            opt.step()
    if scaler is not None:
        scaler.update()
