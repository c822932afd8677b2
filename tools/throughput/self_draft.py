"""The self-speculative draft of the throughput benchmark: the private model's own first k layers.

`fednode.learning.early_exit` builds it (P's embedding, first k layers and head, shared; an exit of
its own); a head over the most frequent tokens of the local code (`--draft-vocab`) cuts the cost of
every drafted token. The exit learns P from one of two data sets (`ExitPlan.data`):

- `code`: KL to P on the site's local code blocks (`early_exit.train_exit`, P runs every step);
- `greedy`: self-distillation on P's own greedy continuations of local-code prompts
  (`greedy_data`), fitted on cached prefix states (`fednode.learning.exit_fit`) by KL or by
  cross-entropy to P's argmax (`ExitPlan.loss`), agreement measured on held-out continuations.

P is never changed, so its drafted output must stay its greedy output (the benchmark checks it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fednode.learning.data import TokenDataset
from fednode.learning.early_exit import (
    early_exit_draft,
    exit_parameters,
    frequent_tokens,
    train_exit,
    with_subset_head,
)
from fednode.learning.exit_fit import LOSSES, ExitSet, fit_exit
from tools.throughput import greedy_data

EXIT_LR = 1e-3
HELDOUT_BATCHES = 2  # the exit's before/after agreement with P (a proxy of acceptance, not the figure)
EXIT_DATA = ("code", "greedy")
DEFAULT_EXIT_DATA = "greedy"  # measured: HumanEval acceptance 0.16-0.22 against 0.11 on code (bench/RESULTS.md)
DEFAULT_GREEDY_LOSS = "kl"
GREEDY_LR = 3e-3
GREEDY_BATCH = 16  # sequences per fit step (cheap: the prefix states are cached)
GREEDY_HELD = 8  # continuations held out for the agreement figure


@dataclass(frozen=True)
class ExitPlan:
    """What the exit learns from and how: data set, loss (greedy data only), learning rate, data size."""

    data: str = "code"
    loss: str = "kl"
    lr: float = EXIT_LR
    prompts: int = greedy_data.PROMPTS
    new_tokens: int = greedy_data.NEW_TOKENS

    @classmethod
    def of(cls, data: str, loss: str, lr: float | None, prompts: int, new_tokens: int) -> ExitPlan:
        """The plan with defaults for unset values (lr None, sizes 0); ValueError on an unknown choice."""
        if data not in EXIT_DATA or loss not in LOSSES:
            raise ValueError(f"exit data {data!r} / loss {loss!r}: use {'|'.join(EXIT_DATA)} / {'|'.join(LOSSES)}")
        if data == "code" and loss != "kl":
            raise ValueError("exit loss top1 needs --exit-data greedy (local code is fitted by KL)")
        default_lr = GREEDY_LR if data == "greedy" else EXIT_LR
        return cls(data, loss, default_lr if lr is None else lr, prompts or greedy_data.PROMPTS,
                   new_tokens or greedy_data.NEW_TOKENS)


def default_exit_layers(total: int) -> int:
    """A quarter of P's depth (at least one layer): shallow enough to be cheap, deep enough to agree."""
    return max(1, total // 4)


def build_self_draft(private, tokenizer, data: TokenDataset, *, layers: int, exit_kind: str, steps: int,
                     batch_size: int, vocab: int, seed: int, progress: Callable[[str], None],
                     plan: ExitPlan | None = None) -> tuple[Any, dict[str, Any]]:
    """(draft, how it was built and trained): exit trained for `steps` batches, head cut to `vocab` tokens."""
    plan = plan or ExitPlan()
    if plan.data == "greedy":
        return _greedy_self_draft(private, tokenizer, data, layers=layers, exit_kind=exit_kind, steps=steps,
                                  vocab=vocab, seed=seed, progress=progress, plan=plan)
    draft = early_exit_draft(private, layers, exit=exit_kind)
    total = private.config.num_hidden_layers
    own = sum(p.numel() for p in exit_parameters(draft, private))
    info: dict[str, Any] = {"method": f"early exit after {layers} of {total} layers of the private model "
                                      f"(shared: embedding, layers, head; own: {exit_kind} exit, {own:,} params)",
                            "layers": layers, "total_layers": total, "exit": exit_kind, "exit_params": own,
                            "steps": steps, "batch_size": batch_size, "seq_len": data.seq_len,
                            "exit_data": "code", "exit_loss": "kl", "lr": plan.lr}
    if steps > 0:
        progress(f"self-draft: training the exit for {steps} steps of {batch_size} x {data.seq_len} tokens "
                 "toward the private model")
        batches = list(data.train_batches(batch_size, steps, seed))
        heldout = data.heldout_batches(batch_size)[:HELDOUT_BATCHES]
        trained = train_exit(draft, private, batches, heldout, lr=plan.lr, progress=progress)
        info.update({"tokens": trained.tokens, "seconds": trained.seconds, "kl_before": trained.kl_before,
                     "kl_after": trained.kl_after, "agreement_before": trained.agreement_before,
                     "agreement_after": trained.agreement_after})
        progress(f"self-draft: top-1 agreement with the private model {trained.agreement_before:.3f} -> "
                 f"{trained.agreement_after:.3f} on held-out code")
    info["vocab"] = None
    if vocab > 0:
        eos = tokenizer.eos_token_id
        keep = frequent_tokens([data.train_blocks], vocab, always=() if eos is None else (int(eos),))
        with_subset_head(draft, keep)
        info["vocab"] = int(keep.numel())
        info["method"] += f", head over the {keep.numel():,} most frequent tokens of the local code"
    return draft.eval(), info


def _describe(private, draft, layers: int, exit_kind: str) -> dict[str, Any]:
    total = private.config.num_hidden_layers
    own = sum(p.numel() for p in exit_parameters(draft, private))
    return {"method": f"early exit after {layers} of {total} layers of the private model "
                      f"(shared: embedding, layers, head; own: {exit_kind} exit, {own:,} params)",
            "layers": layers, "total_layers": total, "exit": exit_kind, "exit_params": own}


def _greedy_self_draft(private, tokenizer, data: TokenDataset, *, layers: int, exit_kind: str, steps: int,
                       vocab: int, seed: int, progress: Callable[[str], None], plan: ExitPlan
                       ) -> tuple[Any, dict[str, Any]]:
    """The draft with its exit fitted on P's own greedy continuations of local code (head cut first)."""
    draft = early_exit_draft(private, layers, exit=exit_kind)
    info = _describe(private, draft, layers, exit_kind)
    eos = tokenizer.eos_token_id
    progress(f"self-draft: P continues {plan.prompts} local-code prompts of {greedy_data.PROMPT_TOKENS} tokens "
             f"by {plan.new_tokens} greedy tokens")
    cont = greedy_data.greedy_continuations(private, data, prompts=plan.prompts,
                                            prompt_tokens=greedy_data.PROMPT_TOKENS, new_tokens=plan.new_tokens,
                                            seed=seed, eos=eos, progress=progress)
    info.update({"exit_data": "greedy", "exit_loss": plan.loss, "lr": plan.lr, "steps": steps,
                 "batch_size": GREEDY_BATCH, "seq_len": cont.sequences.shape[1], "greedy_prompts": plan.prompts,
                 "greedy_new_tokens": plan.new_tokens, "generated_tokens": cont.generated,
                 "generation_seconds": cont.seconds, "vocab": None})
    if vocab > 0:
        new = cont.sequences[:, cont.prompt_tokens:]
        keep = frequent_tokens([data.train_blocks, new], vocab, always=() if eos is None else (int(eos),))
        with_subset_head(draft, keep)
        info["vocab"] = int(keep.numel())
        info["method"] += (f", head over the {keep.numel():,} most frequent tokens of the local code and P's "
                           "continuations of it")
    held = min(GREEDY_HELD, max(1, plan.prompts // 4))
    if plan.prompts - held < 1:
        raise ValueError(f"--greedy-prompts {plan.prompts} leaves no continuation to train on")
    started = time.perf_counter()
    train_set = ExitSet.build(private, draft, layers, cont.sequences[held:], cont.prompt_tokens, plan.loss)
    held_set = ExitSet.build(private, draft, layers, cont.sequences[:held], cont.prompt_tokens, "top1")
    info["cache_seconds"] = time.perf_counter() - started
    info["counted_positions"] = train_set.counted
    fit = fit_exit(draft, private, layers, train_set, held_set, steps=steps, batch=GREEDY_BATCH, lr=plan.lr,
                   seed=seed, progress=progress)
    info.update({"tokens": steps * min(GREEDY_BATCH, len(train_set)) * cont.sequences.shape[1],
                 "seconds": fit.seconds, "agreement_before": fit.agreement_before,
                 "agreement_after": fit.agreement_after, "agreement_on": f"{held} held-out continuations"})
    progress(f"self-draft: top-1 agreement with P on held-out continuations {fit.agreement_before:.3f} -> "
             f"{fit.agreement_after:.3f} ({plan.loss}, lr {plan.lr:g}, {steps} steps)")
    return draft.eval(), info
