"""The `shared-prefix` messenger family: the messenger is the private model's own prefix.

Level k shares the token embedding (tied with the output head) plus the first k decoder layers;
the top level (every layer and the final norm) is the whole model, i.e. FedAvg. Peers average
per coordinate what they hold (HeteroFL / DepthFL / FedKD's shared mentee), and the rest of P
stays local. Growth changes nothing locally (P is unchanged, only more of it travels), so it is
function-preserving by construction. Pure functions over `state_tensors` names.
"""

from __future__ import annotations

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


def top_level(names: list[str] | Mapping[str, object]) -> int:
    """Level = shared layers, so the top level equals the layer count (the whole model)."""
    return num_layers(names)


def in_level(name: str, level: int, top: int) -> bool:
    """Whether tensor `name` travels at `level` (0..top)."""
    if name == EMBED:
        return True
    if name == FINAL_NORM:
        return level >= top
    m = _LAYER.match(name)
    if m is None:  # anything else (an untied head, extra buffers) travels only with the whole model
        return level >= top
    return int(m.group(1)) < level


def level_names(names: list[str] | Mapping[str, object], level: int, top: int) -> list[str]:
    """The names a level shares, in the given order (top: the model's layer count)."""
    if not 0 <= level <= top:
        raise ValueError(f"level {level} is outside the shared-prefix ladder 0..{top}")
    return [n for n in names if in_level(n, level, top)]


def slice_prefix(state: Mapping[str, torch.Tensor], level: int, top: int) -> dict[str, torch.Tensor]:
    """The level's part of a state (full, or at a level >= `level`); shares storage with the input."""
    return {n: state[n] for n in level_names(list(state), level, top)}


def level_param_counts(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Parameters sent at every level 0..top of a full model state."""
    top = top_level(state)
    return [sum(state[n].numel() for n in state if in_level(n, level, top)) for level in range(top + 1)]
