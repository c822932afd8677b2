"""NLL of each HumanEval canonical solution given its prompt, and bits per byte.

Prompt and solution are tokenized separately (no special tokens) and concatenated, so the scored
tokens are exactly the solution's tokens and cover exactly its UTF-8 bytes: bits per byte =
total nats / ln 2 / total solution bytes compares models whose tokenizers differ.

Context: the sequence is cut to its last `max_context` tokens (the prompt loses its start), as in
the environment probe (env.md section 4). A solution that alone does not fit (longer than
max_context - 1 tokens) is scored in overlapping windows, each token with at least
max_context // 2 tokens of context (the usual sliding-window perplexity).

Windows are sorted by length and batched with right padding and no attention mask (causal
attention keeps pads from reaching real tokens) up to a budget of logits elements; where the
model supports a boolean `logits_to_keep` (transformers 5), only the scored positions are
projected onto the vocabulary, else the full logits are computed and indexed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from tools.humaneval.data import Problem

DEFAULT_BATCH_TOKENS = 4096  # tokens per forward pass (also bounded by LOGITS_BUDGET)
LOGITS_BUDGET = 32 << 20  # float32 logits elements kept at once (128 MiB)


@dataclass
class NLLResult:
    """Per-problem nats (summed over solution tokens) and the totals behind bits per byte."""

    task_ids: list[str]
    nats: list[float]
    tokens: list[int]
    bytes: list[int]
    max_context: int
    total_nats: float = 0.0
    total_tokens: int = 0
    total_bytes: int = 0
    nats_per_token: float = 0.0
    bits_per_byte: float = 0.0
    truncated_prompts: int = 0  # problems whose prompt lost its start to max_context
    windowed_solutions: int = 0  # problems whose solution needed several windows
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        d = asdict(self)
        for key in ("task_ids", "nats", "tokens", "bytes"):
            d.pop(key)
        return d

    def per_problem(self) -> list[dict]:
        return [
            {"task_id": t, "nats": n, "tokens": k, "bytes": b, "bits_per_byte": bits_per_byte(n, b)}
            for t, n, k, b in zip(self.task_ids, self.nats, self.tokens, self.bytes, strict=True)
        ]


def bits_per_byte(nats: float, n_bytes: int) -> float:
    """nats / ln 2 / bytes."""
    if n_bytes <= 0:
        raise ValueError(f"bits per byte needs a positive byte count, got {n_bytes}")
    return nats / math.log(2) / n_bytes


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of text with no special tokens added."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Window:
    """Model input ids[start:end] of problem `problem`; targets are positions first..end-1."""

    problem: int
    ids: tuple[int, ...]  # the window's tokens
    first: int  # index in `ids` of the first scored token (>= 1)


def plan_windows(prompt_ids: Sequence[int], sol_ids: Sequence[int], max_context: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) windows over prompt+solution that score each solution token once.

    Targets are absolute positions len(prompt)..len(seq)-1, each needing one token of context.
    """
    if max_context < 2:
        raise ValueError(f"max_context must be at least 2, got {max_context}")
    p, n = len(prompt_ids), len(prompt_ids) + len(sol_ids)
    if p < 1:
        raise ValueError("the prompt must have at least one token (the first solution token needs context)")
    if n - p == 0:
        return []
    if n - p <= max_context - 1:  # the whole solution fits with at least one prompt token
        start = max(0, n - max_context)
        return [(start, n, p)]
    stride = max(1, max_context // 2)  # new targets per window; the rest is context
    out = []
    pos = p
    while pos < n:
        start = max(0, pos - (max_context - stride))
        end = min(n, start + max_context)
        out.append((start, end, pos))
        pos = end
    return out


def _supports_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _batches(windows: list[Window], batch_tokens: int, vocab: int) -> list[list[Window]]:
    """Group windows sorted by length so each batch holds about batch_tokens padded tokens."""
    order = sorted(windows, key=lambda w: len(w.ids))
    out: list[list[Window]] = []
    cur: list[Window] = []
    for w in order:
        length = len(w.ids)  # longest so far in this batch (sorted ascending)
        tokens = length * (len(cur) + 1)
        logits = (sum(len(x.ids) - x.first for x in cur) + len(w.ids) - w.first) * vocab
        if cur and (tokens > batch_tokens or logits > LOGITS_BUDGET):
            out.append(cur)
            cur = []
        cur.append(w)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def _score_batch(model, batch: list[Window], pad_id: int, use_keep: bool) -> tuple[list[float], bool]:
    """Summed nats of each window's targets; second value: whether logits_to_keep worked."""
    length = max(len(w.ids) for w in batch)
    device = _device(model)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    predict = torch.zeros((len(batch), length), dtype=torch.bool)  # position t predicts token t+1
    for row, w in enumerate(batch):
        ids[row, : len(w.ids)] = torch.tensor(w.ids, dtype=torch.long)
        predict[row, w.first - 1 : len(w.ids) - 1] = True
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    wanted = targets[predict].to(device)
    ids, predict_dev = ids.to(device), predict.to(device)
    # No attention mask: padding is on the right, and a causal LM's real tokens never attend to
    # later positions, so the pads cannot change them (and the unmasked causal path is faster).
    logits = None
    if use_keep:
        try:
            out = model(input_ids=ids, use_cache=False, logits_to_keep=predict_dev).logits
            if out.dim() == 2 and out.shape[0] == int(predict.sum()):
                logits = out
        except (TypeError, ValueError, RuntimeError, IndexError):
            logits = None
        use_keep = logits is not None
    if logits is None:
        logits = model(input_ids=ids, use_cache=False).logits[predict_dev]
    nll = F.cross_entropy(logits.float(), wanted, reduction="none").double().cpu()
    rows = torch.arange(len(batch)).unsqueeze(1).expand(-1, length)[predict]
    sums = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, rows, nll)
    return sums.tolist(), use_keep


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def solution_nll(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    max_context: int | None = None,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    progress: Callable[[int, int], None] | None = None,
) -> NLLResult:
    """NLL (nats) of each canonical solution given its prompt, with totals and bits per byte.

    `max_context` defaults to the model's max_position_embeddings (capped at 4096).
    """
    if not problems:
        raise ValueError("no problems to score")
    if max_context is None:
        max_context = min(int(getattr(model.config, "max_position_embeddings", None) or 2048), 4096)
    vocab = int(getattr(model.config, "vocab_size", 0) or len(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    windows: list[Window] = []
    tokens, nbytes = [], []
    truncated = windowed = 0
    for i, prob in enumerate(problems):
        prompt_ids, sol_ids = encode(tokenizer, prob.prompt), encode(tokenizer, prob.canonical_solution)
        seq = prompt_ids + sol_ids
        plan = plan_windows(prompt_ids, sol_ids, max_context)
        truncated += bool(plan) and plan[0][0] > 0
        windowed += len(plan) > 1
        for start, end, first in plan:
            windows.append(Window(i, tuple(seq[start:end]), first - start))
        tokens.append(len(sol_ids))
        nbytes.append(len(prob.canonical_solution.encode("utf-8")))
    nats = [0.0] * len(problems)
    was_training = model.training
    model.eval()
    use_keep = _supports_keep(model)
    batches = _batches(windows, max(batch_tokens, max_context), vocab)
    try:
        for b, batch in enumerate(batches):
            sums, use_keep = _score_batch(model, batch, pad_id, use_keep)
            for w, s in zip(batch, sums, strict=True):
                nats[w.problem] += s
            if progress is not None:
                progress(b + 1, len(batches))
    finally:
        model.train(was_training)
    total_nats, total_tokens, total_bytes = math.fsum(nats), sum(tokens), sum(nbytes)
    return NLLResult(
        task_ids=[p.task_id for p in problems],
        nats=nats,
        tokens=tokens,
        bytes=nbytes,
        max_context=max_context,
        total_nats=total_nats,
        total_tokens=total_tokens,
        total_bytes=total_bytes,
        nats_per_token=total_nats / total_tokens if total_tokens else float("nan"),
        bits_per_byte=bits_per_byte(total_nats, total_bytes),
        truncated_prompts=truncated,
        windowed_solutions=windowed,
    )


class EnsembleLM(torch.nn.Module):
    """The P+M ensemble a site could also serve: next-token mixture 1/2 (p_P + p_M), as log-probs.

    Scores like any causal LM here (its `logits` are log-probabilities, which cross-entropy and
    softmax treat the same). Both models must share the tokenizer.
    """

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second
        self.config = first.config

    def forward(self, input_ids, use_cache: bool = False, **_ignored):
        from types import SimpleNamespace

        a = torch.log_softmax(self.first(input_ids=input_ids, use_cache=False).logits.float(), dim=-1)
        b = torch.log_softmax(self.second(input_ids=input_ids, use_cache=False).logits.float(), dim=-1)
        return SimpleNamespace(logits=torch.logaddexp(a, b) - math.log(2.0))
