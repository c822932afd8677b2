"""Making the messenger a usable drafter when no trained run is given (an untrained draft is never accepted).

- Built-from-config presets: `fednode.learning.distill.MutualTrainer`, the daemon's own round
  step, trains the private model and the messenger together from scratch, as a node does.
- Pretrained private models: the private model stays frozen (it is the model whose greedy
  output is checked), the messenger starts from its embeddings and final norm (the ladder keeps
  the private model's hidden size for exactly this) and is trained on the daemon's messenger
  loss `mutual_losses(...).loss_m` with alpha fixed to 1 (CE + KL to the private model).

Data: one stdlib partition (`fednode.learning.data.stdlib_partitions`), the daemon's local code.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fednode.learning.data import TokenDataset, stdlib_partitions, write_partition
from fednode.learning.distill import MutualTrainer, mutual_losses
from fednode.learning.trainer import GRAD_CLIP, evaluate

DAEMON_LR = 3e-3  # [train] lr and [learning] lr_messenger defaults
PRETRAINED_DRAFT_LR = 1e-3  # lower: the messenger starts from pretrained embeddings
PARTITION_BYTES = 1_500_000


def local_files(seed: int) -> list[Path]:
    """The site's local code for the benchmark: stdlib partition 0 of 3 (as `fednode demo` gives a node)."""
    return stdlib_partitions(3, seed=seed)[0]


def local_code(tokenizer, seq_len: int, max_tokens: int, seed: int, heldout_blocks: int = 4) -> TokenDataset:
    """Token blocks of stdlib partition 0 of 3 (as `fednode demo` gives a node), few held-out blocks.

    Few held-out blocks keep the trainers' before/after evaluations cheap; they are not the figure.
    """
    files = local_files(seed)
    with tempfile.TemporaryDirectory(prefix="fednode-throughput-") as tmp:
        write_partition(files, Path(tmp), max_bytes=PARTITION_BYTES)
        data = TokenDataset.from_dir(Path(tmp), tokenizer, seq_len=seq_len, max_tokens=max_tokens, seed=seed)
    return TokenDataset(data.train_blocks, data.heldout_blocks[:heldout_blocks])


def init_from_private(messenger, private) -> list[str]:
    """Copy the private model's token embeddings and final norm into the messenger (equal shapes only)."""
    p = dict(private.named_parameters())
    copied = []
    with torch.no_grad():
        for name, param in messenger.named_parameters():
            if name in ("model.embed_tokens.weight", "model.norm.weight") and name in p \
                    and p[name].shape == param.shape:
                param.copy_(p[name])
                copied.append(name)
    return copied


Progress = Callable[[str], None]


def _mutual(private, messenger, data: TokenDataset, steps: int, batch_size: int, seed: int,
            progress: Progress) -> dict[str, Any]:
    trainer = MutualTrainer(private, messenger, lr_private=DAEMON_LR, lr_messenger=DAEMON_LR)
    chunk = max(1, min(50, steps))
    done, results = 0, []
    while done < steps:
        n = min(chunk, steps - done)
        results.append(trainer.train(data, steps=n, batch_size=batch_size, seed=seed * 1_000_003 + done))
        done += n
        progress(f"draft: mutual distillation step {done}/{steps}, messenger held-out loss "
                 f"{results[-1].m_loss_after:.3f}, private {results[-1].p_loss_after:.3f}")
    return {"method": "MutualTrainer (the daemon's round step: private and messenger trained together, "
                      "adaptive alpha, lr 3e-3)",
            "seconds": sum(r.seconds for r in results), "private_loss_before": results[0].p_loss_before,
            "private_loss_after": results[-1].p_loss_after, "messenger_loss_before": results[0].m_loss_before,
            "messenger_loss_after": results[-1].m_loss_after}


def _one_way(private, messenger, data: TokenDataset, steps: int, batch_size: int, seed: int,
             progress: Progress) -> dict[str, Any]:
    copied = init_from_private(messenger, private)
    heldout = data.heldout_batches(batch_size)
    before = evaluate(messenger, heldout)
    private.eval()
    messenger.train()
    opt = torch.optim.AdamW(messenger.parameters(), lr=PRETRAINED_DRAFT_LR)
    start = time.perf_counter()
    for i, batch in enumerate(data.train_batches(batch_size, steps, seed), 1):
        with torch.no_grad():
            logits_p = private(input_ids=batch, use_cache=False).logits
        logits_m = messenger(input_ids=batch, use_cache=False).logits
        out = mutual_losses(logits_p, logits_m, batch, alpha=1.0)
        opt.zero_grad(set_to_none=True)
        out.loss_m.backward()
        torch.nn.utils.clip_grad_norm_(messenger.parameters(), GRAD_CLIP)
        opt.step()
        if i % 10 == 0 or i == steps:
            progress(f"draft: distillation step {i}/{steps}, messenger CE {out.ce_m:.3f}, "
                     f"KL to private {out.kl_pm:.3f}")
    seconds = time.perf_counter() - start
    messenger.eval()
    return {"method": "messenger-only distillation from the frozen private model (loss_m of "
                      "fednode.learning.distill.mutual_losses, alpha 1, AdamW lr 1e-3), messenger "
                      f"initialised from the private model's {', '.join(copied) or 'nothing'}",
            "seconds": seconds, "messenger_loss_before": before, "messenger_loss_after": evaluate(messenger, heldout)}


def train_draft(private, messenger, data: TokenDataset, *, steps: int, batch_size: int, seed: int,
                pretrained: bool, progress: Progress) -> dict[str, Any]:
    """Train the draft for `steps` steps; what was done and the losses around it (eval mode after)."""
    if steps <= 0:
        return {"method": "none (untrained messenger)", "steps": 0, "seconds": 0.0}
    run = _one_way if pretrained else _mutual
    info = run(private, messenger, data, steps, batch_size, seed, progress)
    private.eval()
    messenger.eval()
    return {"steps": steps, "batch_size": batch_size, "seq_len": data.seq_len, **info}
