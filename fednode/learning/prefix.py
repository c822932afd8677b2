"""The `shared-prefix` messenger family: the messenger is the private model's own prefix.

Level k shares the token embedding (tied with the output head) plus the first k decoder layers;
the top level (every layer and the final norm) is the whole model, i.e. FedAvg. Peers average
per coordinate what they hold (HeteroFL / DepthFL / FedKD's shared mentee), and the rest of P
stays local. Growth changes nothing locally (P is unchanged, only more of it travels), so it is
function-preserving by construction. Pure functions over `state_tensors` names.

With a **frozen base** (`[learning] frozen_base`, on for pretrained presets) the embedding and an
untied output head are the public pretrained base that every peer already holds: they are not
trained and never sent (their hash is checked at the handshake instead), so level k shares the
first k + 1 layers (level 0 must send something) and the top level is every layer plus the final
norm. For SmolLM2-135M that takes level 0 from 28M+ parameters (the embedding) to one layer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import torch

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def num_layers(names: list[str] | Mapping[str, object]) -> int:
    """Decoder layers of a model from its tensor names."""
    found = {int(m.group(1)) for name in names if (m := _LAYER.match(name))}
    return max(found) + 1 if found else 0


HEAD = "lm_head.weight"
FROZEN = (EMBED, HEAD)  # the public base under a frozen_base: held by every peer, never trained or sent


def top_level(names: list[str] | Mapping[str, object], frozen: bool = False) -> int:
    """Level = shared layers, so the top level equals the layer count (the whole model); with a
    frozen base level k shares k + 1 layers, so the top is one less."""
    return num_layers(names) - (1 if frozen else 0)


def in_level(name: str, level: int, top: int, frozen: bool = False) -> bool:
    """Whether tensor `name` travels at `level` (0..top)."""
    if frozen and name in FROZEN:
        return False
    if name == EMBED:
        return True
    if name == FINAL_NORM:
        return level >= top
    m = _LAYER.match(name)
    if m is None:  # anything else (an untied head, extra buffers) travels only with the whole model
        return level >= top
    return int(m.group(1)) < level + (1 if frozen else 0)


def level_names(names: list[str] | Mapping[str, object], level: int, top: int, frozen: bool = False) -> list[str]:
    """The names a level shares, in the given order (top: the model's top level)."""
    if not 0 <= level <= top:
        raise ValueError(f"level {level} is outside the shared-prefix ladder 0..{top}")
    return [n for n in names if in_level(n, level, top, frozen)]


def slice_prefix(state: Mapping[str, torch.Tensor], level: int, top: int,
                 frozen: bool = False) -> dict[str, torch.Tensor]:
    """The level's part of a state (full, or at a level >= `level`); shares storage with the input."""
    return {n: state[n] for n in level_names(list(state), level, top, frozen)}


def level_param_counts(state: Mapping[str, torch.Tensor], frozen: bool = False) -> list[int]:
    """Parameters sent at every level 0..top of a full model state."""
    top = top_level(state, frozen)
    return [sum(state[n].numel() for n in state if in_level(n, level, top, frozen)) for level in range(top + 1)]


def base_hash(named: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of the frozen base among `named` (name, dtype, shape and bytes of each, in name
    order): peers whose public bases differ must not average their layers over them."""
    digest = hashlib.sha256()
    for name in sorted(n for n in named if n in FROZEN):
        t = named[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
