"""The self-speculative draft of the throughput benchmark: the private model's own first k layers.

`fednode.learning.early_exit` builds it (P's embedding, first k layers and head, shared; an exit of
its own) and trains the exit toward P by distillation on the site's local code; a head over the
most frequent tokens of that code (`--draft-vocab`) cuts the cost of every drafted token. P is
never changed, so its drafted output must stay its greedy output (the benchmark checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fednode.learning.data import TokenDataset
from fednode.learning.early_exit import (
    early_exit_draft,
    exit_parameters,
    frequent_tokens,
    train_exit,
    with_subset_head,
)

EXIT_LR = 1e-3
HELDOUT_BATCHES = 2  # the exit's before/after agreement with P (a proxy of acceptance, not the figure)


def default_exit_layers(total: int) -> int:
    """A quarter of P's depth (at least one layer): shallow enough to be cheap, deep enough to agree."""
    return max(1, total // 4)


def build_self_draft(private, tokenizer, data: TokenDataset, *, layers: int, exit_kind: str, steps: int,
                     batch_size: int, vocab: int, seed: int, progress: Callable[[str], None]
                     ) -> tuple[Any, dict[str, Any]]:
    """(draft, how it was built and trained): exit trained for `steps` batches, head cut to `vocab` tokens."""
    draft = early_exit_draft(private, layers, exit=exit_kind)
    total = private.config.num_hidden_layers
    own = sum(p.numel() for p in exit_parameters(draft, private))
    info: dict[str, Any] = {"method": f"early exit after {layers} of {total} layers of the private model "
                                      f"(shared: embedding, layers, head; own: {exit_kind} exit, {own:,} params)",
                            "layers": layers, "total_layers": total, "exit": exit_kind, "exit_params": own,
                            "steps": steps, "batch_size": batch_size, "seq_len": data.seq_len}
    if steps > 0:
        progress(f"self-draft: training the exit for {steps} steps of {batch_size} x {data.seq_len} tokens "
                 "toward the private model")
        batches = list(data.train_batches(batch_size, steps, seed))
        heldout = data.heldout_batches(batch_size)[:HELDOUT_BATCHES]
        trained = train_exit(draft, private, batches, heldout, lr=EXIT_LR, progress=progress)
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
