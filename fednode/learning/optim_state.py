"""Optimizer state as named tensors, so checkpoints carry Adam's moments across a restart.

Without it a restored node restarts Adam from zero moments with step 1 (bias correction boosts
the first updates) and loses the curvature estimates it had. Keys are
`optim.<role>.<param name>.<state key>` (exp_avg, exp_avg_sq, step, ...), kept apart from the
model tensors so nothing that reads `private.*` / `messenger.*` sees them.
"""

from __future__ import annotations

import torch

PREFIX = "optim."


def optimizer_tensors(role: str, model, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every per-parameter state tensor of `optimizer` over `model`'s named parameters (CPU copies)."""
    out = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"{PREFIX}{role}.{name}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
    return out


def load_optimizer_tensors(role: str, model, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> int:
    """Put saved state back for every parameter whose moments match its shape; returns how many.

    A parameter without saved state (or with a shape that no longer fits, after a level change)
    keeps a fresh state: restoring never fails on old or foreign checkpoints.
    """
    restored = 0
    for name, param in model.named_parameters(remove_duplicate=True):
        head = f"{PREFIX}{role}.{name}."
        state = {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}
        moments = [v for k, v in state.items() if k != "step"]
        if not state or any(v.shape != param.shape for v in moments):
            continue
        optimizer.state[param] = {k: (v.to(torch.float32) if k == "step" else v.to(param.device, param.dtype).clone())
                                  for k, v in state.items()}
        restored += 1
    return restored


def model_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors without the optimizer state."""
    return {k: v for k, v in tensors.items() if not k.startswith(PREFIX)}
