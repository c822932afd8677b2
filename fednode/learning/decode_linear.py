"""Linear layers that pick their matrix-product layout by how many rows a decode forward carries.

On a CPU, `torch.nn.functional.linear` over 2-9 rows (a speculative verification: the committed
token plus a few drafts) takes an oneDNN/MKL path that streams the weight less well than it does
for one row: on a 2-core EPYC a SmolLM2-135M forward over 2 tokens cost 1.56x one over 1 token,
so verifying a draft cost more than the tokens it saved. The same product written as
`(W @ x.T).T` over 2 rows cost 0.91x of F.linear's 1 row, and `x @ W.T` from a contiguous
transposed copy cost 0.85x at 1 row. Which layout wins depends on the machine, the dtype and the
row count, so it is measured (`choose_layouts` over times the caller takes), never assumed.

`DecodeLinear` shares its weight and bias with the layer it replaces (tied embeddings stay tied,
state_dict keys are unchanged); the transposed copy is refreshed whenever the weight changes in
place (an optimizer step), so training through it stays correct, only slower.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

LINEAR, W_XT, X_WT = "linear", "w-xt", "x-wt"
LAYOUTS = (LINEAR, W_XT, X_WT)  # F.linear; (W @ x.T).T; x @ copy of W.T (one weight-sized copy more)
MAX_ROWS = 16  # plans cover forwards of up to this many rows (decode steps, verification, small batches)


class DecodeLinear(torch.nn.Linear):
    """An nn.Linear whose forward uses `plan[rows]` (a layout of LAYOUTS) for `rows` <= MAX_ROWS input rows."""

    def __init__(self, layer: torch.nn.Linear, plan: Mapping[int, str]) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.weight = layer.weight  # the same Parameter: tying and state_dict keys survive
        self.bias = layer.bias
        self.plan = dict(plan)
        self._copy: torch.Tensor | None = None
        self._copy_of: tuple[int, int, torch.dtype, torch.device] | None = None

    def _transposed(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._copy is None or self._copy_of != key:
            self._copy = w.detach().t().contiguous()
            self._copy_of = key
        return self._copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features if self.in_features else 0
        layout = self.plan.get(rows, LINEAR)
        if layout == LINEAR or (layout == X_WT and torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)  # the copy carries no gradient: train through F.linear
        flat = x.reshape(rows, self.in_features)
        y = (self.weight @ flat.t()).t() if layout == W_XT else flat @ self._transposed()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def check_plan(plan: Mapping[int, str]) -> dict[int, str]:
    """The plan as a dict, or ValueError naming the bad entry."""
    for rows, layout in plan.items():
        if not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"a decode plan covers 1..{MAX_ROWS} rows, got {rows!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"decode layout {layout!r} for {rows} rows is not one of {', '.join(LAYOUTS)}")
    return dict(plan)


def install(model: torch.nn.Module, plan: Mapping[int, str]) -> int:
    """Give every nn.Linear of `model` the plan (replacing it by a DecodeLinear, or updating one); returns how many."""
    plan = check_plan(plan)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DecodeLinear):
                child.plan = dict(plan)
                count += 1
            elif type(child) is torch.nn.Linear:
                setattr(parent, name, DecodeLinear(child, plan))
                count += 1
    return count


def choose_layouts(times: Mapping[int, Mapping[str, float]], margin: float = 0.03) -> dict[int, str]:
    """Per row count, the fastest measured layout; F.linear unless another beats it by more than `margin`.

    `times[rows][layout]` are seconds of the same forward. The margin keeps torch's default where
    the difference is noise (a layout change also changes rounding)."""
    plan = {}
    for rows, by_layout in times.items():
        if LINEAR not in by_layout:
            raise ValueError(f"times for {rows} rows lack the {LINEAR!r} baseline")
        best = min(by_layout, key=lambda k: by_layout[k])
        plan[rows] = best if by_layout[best] < by_layout[LINEAR] * (1 - margin) else LINEAR
    return check_plan(plan)
