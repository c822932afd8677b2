"""The `lora` messenger family: a shared LoRA adapter on a frozen base, capacity = its rank.

P is the frozen base (the pretrained model every site holds, its hash checked at the handshake)
plus two adapters on the same projections (peft, both active, their outputs summed): a **shared**
adapter, whose first `ranks[level]` components travel and are averaged per coordinate (peers at a
lower level hold fewer rows of A and columns of B: HetLoRA's zero-padding rule), and a **private**
adapter that never leaves (FedDPA's global + local adapters). The shared adapter is allocated at
the top rank; the components above the level's rank have B = 0 and their gradients masked, so
they change nothing. Growth draws their A rows from the agreed growth seed (every peer the same)
and unmasks them: with B = 0 the model is unchanged (function-preserving). Shrinking zeroes the
dropped columns of B (and their Adam moments) and masks them again.

The scale of an adapter is fixed (lora_alpha = r, scale 1), so growing its rank does not rescale
what it has learned. Names on the wire are the base model's module names with `.lora_A.weight` /
`.lora_B.weight` (no peft prefix, no adapter name).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Mapping
from typing import Any, cast

import torch

from fednode.learning.models import SEEDED_INIT

SHARED = "shared"
PRIVATE = "private"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama-style blocks
INIT_SEED = 0  # the shared adapter's first A rows: the same at every peer, so their average means something
_PEFT_PREFIX = "base_model.model."


def target_modules(model: torch.nn.Module) -> list[str]:
    """The Llama-style projections of `model` that carry adapters (ValueError if it has none)."""
    found = sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                    if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS})
    if not found:
        raise ValueError(f"the model has none of the projections a LoRA adapter attaches to ({', '.join(TARGETS)})")
    return found


def smallest_dim(model: torch.nn.Module, targets: list[str]) -> int:
    """The smallest input or output width among the target projections: no rank may exceed it."""
    return min(min(mod.in_features, mod.out_features) for name, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets)


def base_hash(model: torch.nn.Module) -> str:
    """SHA-256 of every base weight (name, dtype, shape, bytes; name order): peers whose frozen bases
    differ must not average adapters trained on them."""
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def attach(model: torch.nn.Module, top_rank: int, private_rank: int, private_seed: int):
    """Freeze `model` and wrap it with the shared adapter (allocated at `top_rank`) and, when
    `private_rank` > 0, the private one (both active). Returns the peft model."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)

    def config(r: int) -> LoraConfig:
        return LoraConfig(r=r, lora_alpha=r, target_modules=targets, lora_dropout=0.0, bias="none")

    active = [SHARED]
    # peft draws its initial A from torch's one global generator: unlocked, that draw interleaved
    # with another node's seeded build in the same process (the sim harness), that node's base came
    # out different, its family hash too, and the two never formed a mesh (CI's LoRA smoke hung
    # waiting for membership). The draw is overwritten below anyway; it only must not disturb others.
    with SEEDED_INIT, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft asks transformers a deprecated question (is_gradient_checkpointing)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config(top_rank), adapter_name=SHARED)
        if private_rank > 0:
            peft_model.add_adapter(PRIVATE, config(private_rank))
            active.append(PRIVATE)
    cast(Any, peft_model.base_model).set_adapter(active)  # a LoraModel: both train, their outputs add up
    # A drawn from our seeds, not peft's global generator: the shared A is the same at every peer
    for adapter, seed in ((SHARED, INIT_SEED), (PRIVATE, private_seed)):
        with torch.no_grad():
            for n, p in adapter_params(peft_model, adapter).items():
                if is_a(n):
                    p.copy_(seeded_rows(n, p.shape[0], p.shape[1], seed))
    return peft_model


def adapter_params(peft_model, adapter: str) -> dict[str, torch.nn.Parameter]:
    """An adapter's parameters by wire name (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    marker = f".{adapter}."
    out = {}
    for name, p in peft_model.named_parameters():
        if marker in name and (".lora_A." in name or ".lora_B." in name):
            wire = name.removeprefix(_PEFT_PREFIX).replace(marker, ".")
            out[wire] = p
    return out


def is_a(name: str) -> bool:
    return ".lora_A." in name


def level_shapes(full: Mapping[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the first `rank` components (A: rank x in, B: out x rank) of full-rank shapes."""
    return {n: ((rank, s[1]) if is_a(n) else (s[0], rank)) for n, s in full.items()}


def slice_rank(params: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Copies of the first `rank` components of every tensor."""
    return {n: (t[:rank] if is_a(n) else t[:, :rank]).detach().clone() for n, t in params.items()}


def load_rank(params: Mapping[str, torch.nn.Parameter], state: Mapping[str, torch.Tensor]) -> None:
    """Write `state` (a rank prefix, any rank up to the allocation) into the leading components."""
    with torch.no_grad():
        for n, t in state.items():
            p = params[n]
            if is_a(n):
                p[: t.shape[0]].copy_(t.to(p.device, p.dtype))
            else:
                p[:, : t.shape[1]].copy_(t.to(p.device, p.dtype))


def seeded_rows(name: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """A rows for newly shared components: peft's Kaiming-uniform init drawn from `seed` and the
    tensor's name, so every peer growing under one agreement draws the same values."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
                                        % 2**63)
    bound = 1 / math.sqrt(cols)  # kaiming_uniform_(a=sqrt(5)) on a (rows, cols) weight
    return (torch.rand((rows, cols), generator=gen) * 2 - 1) * bound


def resize(params: Mapping[str, torch.nn.Parameter], old_rank: int, new_rank: int, growth_seed: int,
           optimizer: torch.optim.Optimizer | None = None) -> None:
    """Grow (A rows drawn from the seed, B columns 0: the function is unchanged) or shrink (the
    dropped B columns zeroed) the active rank; the moments of those components are reset."""
    if new_rank == old_rank:
        return
    lo, hi = sorted((old_rank, new_rank))
    with torch.no_grad():
        for n, p in params.items():
            if is_a(n):
                if new_rank > old_rank:
                    p[lo:hi].copy_(seeded_rows(n, hi - lo, p.shape[1], growth_seed).to(p.device, p.dtype))
            else:
                p[:, lo:hi].zero_()
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for key in ("exp_avg", "exp_avg_sq"):
                moment = state.get(key)
                if moment is not None:
                    (moment[lo:hi] if is_a(n) else moment[:, lo:hi]).zero_()


class RankMask:
    """Gradient hooks that keep the components above the active rank where they are."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], rank: int):
        self.rank = rank
        for n, p in params.items():
            p.register_hook(self._hook(is_a(n)))

    def _hook(self, a: bool):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            grad = grad.clone()
            if a:
                grad[self.rank:] = 0
            else:
                grad[:, self.rank:] = 0
            return grad
        return hook


def merged_model(base: torch.nn.Module, adapters: Mapping[str, torch.Tensor], top_rank: int, private_rank: int,
                 with_private: bool) -> torch.nn.Module:
    """A plain transformers model: `base` with the checkpoint's adapters (`adapters`: the learner's
    checkpoint names, `<module>.lora_A.<adapter>.weight`) merged into its weights: the shared one,
    plus the private one when `with_private` (the site's P; without it, the mesh's model).
    ValueError when the tensors do not fit."""
    peft_model = attach(base, top_rank, private_rank, 0)
    wanted = [SHARED, PRIVATE] if with_private and private_rank > 0 else [SHARED]
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            key = name.removeprefix(_PEFT_PREFIX)
            saved = adapters.get(key)
            if saved is None or tuple(saved.shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor {key} is missing or of another shape")
            p.copy_(saved.to(p.dtype))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return peft_model.merge_and_unload(adapter_names=wanted)
