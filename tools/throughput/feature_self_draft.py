"""The throughput benchmark's feature draft (`--draft features`): EAGLE's one layer over P's features.

Data: P's own greedy continuations (`greedy_data.greedy_ragged`) of prompts shaped like the
inference traffic (`greedy_data.function_prompts`: a function's `def` line and docstring from the
site's local code, never HumanEval), cached once as P's features (`FeatureSet`); then
`fit_feature_draft` trains the draft's fc and layer on them. The head can be cut to the most
frequent tokens of that code and of P's continuations (`--draft-vocab`), as for the early exit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fednode.learning.early_exit import frequent_tokens
from fednode.learning.feature_draft import FeatureDraft, FeatureSet, fit_feature_draft
from tools.throughput import greedy_data

LR = 1e-3
BATCH = 16
HELD = 16  # continuations held out for the agreement figure
PROMPTS = 320
NEW_TOKENS = 64


@dataclass(frozen=True)
class FeaturePlan:
    """How much P writes for the draft to learn from, and how long the draft trains on it."""

    prompts: int = PROMPTS
    new_tokens: int = NEW_TOKENS
    steps: int = 600
    lr: float = LR
    code_tokens: int = 0  # tokens of the local code itself (P's features and argmax on it) beside P's continuations

    @classmethod
    def of(cls, prompts: int, new_tokens: int, steps: int, lr: float | None, code_tokens: int = 0) -> FeaturePlan:
        """The plan with defaults for unset values (sizes 0, lr None)."""
        if code_tokens < 0:
            raise ValueError(f"code tokens must be >= 0, got {code_tokens}")
        return cls(prompts or PROMPTS, new_tokens or NEW_TOKENS, steps, LR if lr is None else lr, code_tokens)


def build_feature_draft(private, tokenizer, files: Sequence[Path], *, vocab: int, seed: int, plan: FeaturePlan,
                        progress: Callable[[str], None], code: torch.Tensor | None = None
                        ) -> tuple[FeatureDraft, dict[str, Any]]:
    """(the trained draft in eval mode, how it was built): P is never changed. `code` (blocks, T): token
    blocks of the local code, trained on beside P's continuations (every position: P's features on
    real code and P's argmax there), when the plan asks for code tokens."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the feature draft's greedy data needs the tokenizer's EOS id (it pads with it)")
    texts = greedy_data.function_prompts(files, plan.prompts, seed)
    if len(texts) <= HELD:
        raise ValueError(f"the local code has {len(texts)} functions with docstrings; the feature draft needs "
                         f"more than {HELD}: give it more code")
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"][-greedy_data.FUNCTION_PROMPT_TOKENS:]
               for t in texts]
    progress(f"feature draft: P continues {len(prompts)} function prompts of the local code by {plan.new_tokens} "
             "greedy tokens")
    data = greedy_data.greedy_ragged(private, prompts, new_tokens=plan.new_tokens, eos=int(eos), progress=progress)
    draft = FeatureDraft(private)
    own = sum(p.numel() for p in draft.own_parameters())
    info: dict[str, Any] = {
        "method": f"feature draft (EAGLE): fc + one decoder layer over P's top features and embedding, P's head "
                  f"({own:,} own params)",
        "exit_params": own, "exit_data": "function prompts", "greedy_prompts": len(prompts),
        "greedy_new_tokens": plan.new_tokens, "generated_tokens": data.generated,
        "generation_seconds": data.seconds, "steps": plan.steps, "batch_size": BATCH, "lr": plan.lr, "vocab": None}
    if vocab > 0:
        new = [torch.tensor(s[start:]) for s, start in zip(data.sequences, data.starts, strict=True)]
        everything = [torch.tensor(s) for s in data.sequences]
        keep = frequent_tokens([torch.cat(everything), torch.cat(new)], vocab, always=(int(eos),))
        draft.use_subset_head(keep)
        info["vocab"] = int(keep.numel())
        info["method"] += f", head over the {keep.numel():,} most frequent tokens of the prompts and P's continuations"
    cached = FeatureSet.build(private, data.sequences, data.starts, pad=int(eos))
    train, held = cached.split(HELD)
    if code is not None and code.numel():
        progress(f"feature draft: P's features on {code.numel():,} tokens of the local code ({len(code)} blocks)")
        blocks = [row.tolist() for row in code]
        train = train.join(FeatureSet.build(private, blocks, [1] * len(blocks), pad=int(eos)), pad=int(eos))
        info["code_tokens"] = int(code.numel())
    fit = fit_feature_draft(draft, train, held, steps=plan.steps, batch=BATCH, lr=plan.lr, seed=seed,
                            progress=progress)
    info.update({"seconds": fit.seconds, "agreement_before": fit.agreement_before,
                 "agreement_after": fit.agreement_after, "agreement_on": f"{HELD} held-out continuations",
                 "counted_positions": int(train.counted.sum())})
    progress(f"feature draft: agreement with P on held-out continuations {fit.agreement_before:.3f} -> "
             f"{fit.agreement_after:.3f} ({plan.steps} steps)")
    return draft.eval(), info
