"""Training tokens/s of the daemon's own trainer steps, and what a round of them costs.

- `mutual`: `MutualTrainer` (adaptive/static modes: one step trains the private model and the
  messenger together) — what a node's round actually runs;
- `private` and `messenger`: `LocalTrainer` on each model alone (the `fedavg`/`local` modes'
  step), which splits the mutual step's cost between the two models.

Each is timed over `steps` steps after one untimed warm-up step; `seconds` excludes the
trainers' held-out evaluations. The models are trained in place: run this last.
"""

from __future__ import annotations

from typing import Any

from fednode.config import DataSection, TrainSection
from fednode.learning.data import TokenDataset
from fednode.learning.distill import MutualTrainer
from fednode.learning.trainer import LocalTrainer

DAEMON = TrainSection()
ROUND_STEPS, BATCH, SEQ = DAEMON.steps_per_round, DAEMON.batch_size, DataSection().seq_len


def _figures(tokens: int, seconds: float, steps: int) -> dict[str, Any]:
    step_s = seconds / steps
    return {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "step_s": step_s, "round_s": step_s * ROUND_STEPS}


def time_training(private, messenger, data: TokenDataset, *, steps: int, seed: int) -> dict[str, Any]:
    """Tokens/s and seconds per daemon round (steps_per_round x batch_size x seq_len) of each trainer."""
    out: dict[str, Any] = {"batch_size": BATCH, "seq_len": data.seq_len, "round_steps": ROUND_STEPS,
                           "round_tokens": ROUND_STEPS * BATCH * data.seq_len}
    mutual = MutualTrainer(private, messenger, lr_private=DAEMON.lr, lr_messenger=DAEMON.lr)
    mutual.train(data, steps=1, batch_size=BATCH, seed=seed)
    r = mutual.train(data, steps=steps, batch_size=BATCH, seed=seed + 1)
    out["mutual"] = _figures(r.tokens, r.seconds, steps)
    for name, model in (("private", private), ("messenger", messenger)):
        trainer = LocalTrainer(model, lr=DAEMON.lr)
        trainer.train(data, steps=1, batch_size=BATCH, seed=seed)
        r = trainer.train(data, steps=steps, batch_size=BATCH, seed=seed + 1)
        out[name] = _figures(r.tokens, r.seconds, steps)
    private.eval()
    messenger.eval()
    return out
