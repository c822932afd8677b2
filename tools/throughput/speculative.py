"""Greedy speculative decoding at batch 1, our own loop: one draft forward per draft token, one
target forward per step, both on their own KV caches.

transformers' assisted generation runs a nested `generate` for every draft step (logits
processors, stopping criteria, cache bookkeeping); on a 2-core CPU that overhead cost ~40 % on
top of Leviathan's bound with the self-draft. This loop does only the work the bound counts:
draft `length` tokens (the draft's own `DynamicCache`), verify them in one forward of the target
over the last committed token plus the drafts, keep the longest prefix matching the target's
argmax, append the target's own next token, and crop both caches back to what is committed.

Every committed token is the target's argmax given the committed prefix, so the output is the
target's greedy output whatever the draft proposes (a test checks it with a draft that is always
wrong). `banned` ids are never generated: the benchmark forces `max_new_tokens` (transformers'
`min_new_tokens` masks EOS), and the loop must mask the same ids to give the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from fednode.learning.feature_draft import FeatureDraft, features
from tools.throughput.draft_tree import CHAIN, Tree, TreeShape, accept, lookup_continuation, tree_inputs
from tools.throughput.generation import WARMUP_TOKENS, GenRun, fixed_draft_length, sync, time_assisted
from tools.throughput.metrics import Acceptance


@dataclass(frozen=True)
class Decoded:
    """One prompt's new tokens and how the draft fared (the first target call reads the prompt too)."""

    tokens: list[int]
    target_calls: int
    proposed: int
    accepted: int
    target_seconds: float = 0.0  # in the target's forwards after the first (which reads the prompt)
    draft_seconds: float = 0.0  # in the draft's forwards
    first_seconds: float = 0.0  # the first target forward: prompt + first drafts

    @property
    def acceptance(self) -> Acceptance:
        return Acceptance(self.target_calls, self.proposed, self.accepted, len(self.tokens))


def _crop(cache: DynamicCache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _allowed(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """The logits with `banned` ids at -inf (a copy; unchanged when nothing is banned)."""
    if banned:
        logits = logits.clone()
        logits[..., list(banned)] = float("-inf")
    return logits


def _argmax(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    return _allowed(logits, banned).argmax(-1)


def _ids(tokens: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(tokens)], dtype=torch.long, device=device)


class _Steps:
    """One decode's committed tokens and counts: what both loops share around their forwards."""

    def __init__(self, prompt: Sequence[int], max_new_tokens: int, length: int) -> None:
        if max_new_tokens < 1 or length < 0 or not prompt:
            raise ValueError(f"need a prompt, max_new_tokens >= 1 and length >= 0 (got {len(prompt)}, "
                             f"{max_new_tokens}, {length})")
        self.prompt, self.max_new, self.length = len(prompt), max_new_tokens, length
        self.seq = list(prompt)
        self.calls = self.proposed = self.accepted = 0
        self.t_time = self.d_time = self.first_time = 0.0

    @property
    def running(self) -> bool:
        return len(self.seq) - self.prompt < self.max_new

    def draft_length(self) -> int:
        return min(self.length, self.max_new - (len(self.seq) - self.prompt) - 1)  # never draft past the end

    def commit(self, drafts: list[int], best: list[int], drafted_at: float) -> int:
        """Keep the longest prefix of `drafts` matching the target's argmax `best`, then the target's own
        next token; returns how many drafts were kept. `best[i]` follows seq + drafts[:i]."""
        m = 0
        while m < len(drafts) and drafts[m] == best[m]:
            m += 1
        self.commit_path([*drafts[:m], best[m]], len(drafts), drafted_at)
        return m

    def commit_path(self, tokens: list[int], proposed: int, drafted_at: float) -> None:
        """Commit a verified path: its drafts P agreed with, then P's own next token (the last)."""
        spent = time.perf_counter() - drafted_at
        if self.calls:
            self.t_time += spent
        else:
            self.first_time = spent  # the first call reads the prompt too
        self.calls += 1
        self.seq += tokens
        self.proposed += proposed
        self.accepted += len(tokens) - 1

    def decoded(self) -> Decoded:
        return Decoded(self.seq[self.prompt:], self.calls, self.proposed, self.accepted, self.t_time, self.d_time,
                       self.first_time)


@torch.no_grad()
def speculative_greedy(target, draft, prompt: Sequence[int], max_new_tokens: int, length: int,
                       banned: Sequence[int] = ()) -> Decoded:
    """Exactly `max_new_tokens` greedy tokens of `target` after `prompt`, drafted `length` at a time."""
    steps = _Steps(prompt, max_new_tokens, length)
    device = next(target.parameters()).device
    t_cache, d_cache = DynamicCache(), DynamicCache()
    while steps.running:
        seq, committed, k = steps.seq, len(steps.seq), steps.draft_length()
        drafts: list[int] = []
        pending = seq[d_cache.get_seq_length():]  # committed tokens the draft has not seen yet
        started = time.perf_counter()
        for _ in range(k):
            out = draft(input_ids=_ids(pending, device), cache=d_cache, use_cache=True, logits_to_keep=1)
            drafts.append(int(_argmax(out.logits[0, -1], banned)))
            pending = drafts[-1:]
        drafted = time.perf_counter()
        steps.d_time += drafted - started
        fed = [*seq[t_cache.get_seq_length():], *drafts]  # the whole prompt on the first call (as transformers)
        logits = target(input_ids=_ids(fed, device), cache=t_cache, use_cache=True, logits_to_keep=k + 1).logits
        m = steps.commit(drafts, _argmax(logits[0], banned).tolist(), drafted)
        _crop(t_cache, len(steps.seq) - 1)  # the target has seen every committed token but the newest
        if k:
            _crop(d_cache, committed + min(m, k - 1))  # the draft saw seq[:committed] and drafts[:k-1]
    return steps.decoded()


@torch.no_grad()
def feature_speculative_greedy(target, draft: FeatureDraft, prompt: Sequence[int], max_new_tokens: int,
                               length: int, banned: Sequence[int] = ()) -> Decoded:
    """As `speculative_greedy`, with a draft that reads the target's top features (EAGLE).

    The target's forward returns its features for every token it reads; those of committed tokens
    are kept (`feats`, one per token the target has seen). The draft's input at position j is
    (feats[j], seq[j + 1]); it first catches up on the positions committed since its last step
    (true features), then drafts on its own predicted features, and is cropped back to the true ones.
    """
    steps = _Steps(prompt, max_new_tokens, length)
    device = next(target.parameters()).device
    t_cache, d_cache = DynamicCache(), DynamicCache()
    feats: torch.Tensor | None = None  # (1, n, H): the target's features of seq[:n], n = what it has seen
    while steps.running:
        seq = steps.seq
        k = steps.draft_length() if feats is not None else 0  # the first call reads the prompt: no features yet
        drafts: list[int] = []
        started = time.perf_counter()
        if k and feats is not None:
            seen, n = d_cache.get_seq_length(), feats.shape[1]
            hidden = draft(feats[:, seen:n], _ids(seq[seen + 1:n + 1], device), cache=d_cache)[:, -1:]
            for i in range(k):
                drafts.append(int(_argmax(draft.logits(hidden)[0, -1], banned)))
                if i + 1 < k:
                    hidden = draft(hidden, _ids(drafts[-1:], device), cache=d_cache)
            _crop(d_cache, n)  # positions drafted on predicted features are redone on the true ones
        drafted = time.perf_counter()
        steps.d_time += drafted - started
        fed = [*seq[t_cache.get_seq_length():], *drafts]
        hidden_t = features(target, _ids(fed, device), cache=t_cache)
        m = steps.commit(drafts, _argmax(target.lm_head(hidden_t[:, -(k + 1):])[0], banned).tolist(), drafted)
        kept = hidden_t[:, :len(fed) - k + m]  # the target's features of the tokens now committed
        feats = kept if feats is None else torch.cat([feats, kept], 1)
        _crop(t_cache, len(steps.seq) - 1)
    return steps.decoded()


def _keep_cache(cache: DynamicCache, prefix: int, nodes: list[int]) -> None:
    """Keep the first `prefix` cached positions and the tree nodes `nodes` (offsets after the prefix)."""
    if nodes == list(range(len(nodes))):  # a chain prefix: a crop
        _crop(cache, prefix + len(nodes))
        return
    index = torch.tensor([*range(prefix), *(prefix + n for n in nodes)], device=cache.layers[0].keys.device)
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def _top(logits: torch.Tensor, banned: Sequence[int], width: int) -> list[int]:
    return _allowed(logits, banned).topk(width, -1).indices.tolist()


@torch.no_grad()
def feature_tree_greedy(target, draft: FeatureDraft, prompt: Sequence[int], max_new_tokens: int, length: int,
                        shape: TreeShape, banned: Sequence[int] = ()) -> Decoded:
    """As `feature_speculative_greedy`, verifying a tree: the draft's chain of `length` tokens, its
    `shape.width - 1` runners-up at every depth as siblings and, with `shape.lookup`, the prompt-lookup
    continuation of the committed text as a branch (`draft_tree`), all in one target forward.

    The target keeps the path it agrees with (its cache and features gathered to that path); the
    draft is cropped back to the true features as in the chain loop.
    """
    width = shape.width
    steps = _Steps(prompt, max_new_tokens, length)
    device = next(target.parameters()).device
    dtype = next(target.parameters()).dtype
    t_cache, d_cache = DynamicCache(), DynamicCache()
    feats: torch.Tensor | None = None
    while steps.running:
        seq = steps.seq
        k = steps.draft_length() if feats is not None else 0
        chain: list[int] = []
        siblings: list[list[int]] = []
        started = time.perf_counter()
        if k and feats is not None:
            seen, n = d_cache.get_seq_length(), feats.shape[1]
            hidden = draft(feats[:, seen:n], _ids(seq[seen + 1:n + 1], device), cache=d_cache)[:, -1:]
            for i in range(k):
                top = _top(draft.logits(hidden)[0, -1], banned, width)
                chain.append(top[0])
                siblings.append(top[1:])
                if i + 1 < k:
                    hidden = draft(hidden, _ids(chain[-1:], device), cache=d_cache)
            _crop(d_cache, n)
        tree = Tree.of(chain, siblings)
        if shape.lookup and k:  # the lookup costs no forward: it may reach deeper than the draft
            room = steps.max_new - (len(seq) - steps.prompt) - 1
            tree = tree.with_path(lookup_continuation(seq, min(max(k, shape.lookup_depth), room)))
        tree = tree.pruned(shape.max_nodes)
        drafted = time.perf_counter()
        steps.d_time += drafted - started
        past = t_cache.get_seq_length()
        pending = seq[past:]
        if len(tree):
            mask, positions = tree_inputs(tree, past, len(pending), dtype, device)
            hidden_t = features(target, _ids([*pending, *tree.tokens], device), cache=t_cache,
                                attention_mask=mask, position_ids=positions)
        else:
            hidden_t = features(target, _ids(pending, device), cache=t_cache)
        best = _argmax(target.lm_head(hidden_t[:, len(pending) - 1:])[0], banned).tolist()
        path, kept = accept(tree, best[0], best[1:])
        steps.commit_path(path, len(chain), drafted)
        _keep_cache(t_cache, past + len(pending), kept)
        rows = torch.tensor([*range(len(pending)), *(len(pending) + i for i in kept)], device=device)
        kept_feats = hidden_t.index_select(1, rows)
        feats = kept_feats if feats is None else torch.cat([feats, kept_feats], 1)
    return steps.decoded()


@torch.no_grad()
def time_feature_draft(target, draft: FeatureDraft, prompts: Sequence[Sequence[int]], tokens: int) -> GenRun:
    """The feature draft alone at batch 1: `tokens` steps on its own features after each prompt.

    The target reads each prompt first (untimed) for the draft's first input; the draft then runs
    one single-token forward per token, which is what drafting costs inside the loop.
    """
    device = next(target.parameters()).device
    run = GenRun(1)
    for prompt in prompts:
        ids = _ids(prompt, device)
        feats = features(target, ids)
        cache = DynamicCache()
        out: list[int] = []
        sync(device)
        start = time.perf_counter()
        hidden = draft(feats[:, :-1], ids[:, 1:], cache=cache)[:, -1:]
        for _ in range(tokens):
            out.append(int(draft.logits(hidden)[0, -1].argmax()))
            hidden = draft(hidden, _ids(out[-1:], device), cache=cache)
        sync(device)
        run.seconds += time.perf_counter() - start
        run.tokens += tokens
        run.calls += 1
        run.outputs.append(out)
    return run


MAX_VERIFY = 13  # verification costs measured for 1..13 tokens: chains up to 12, trees of width 2 up to 6


@torch.no_grad()
def verify_costs(target, prompt: Sequence[int], token_seconds: float, max_tokens: int = MAX_VERIFY,
                 reps: int = 5) -> list[float]:
    """v[n - 1]: one cached forward of the target over n = 1..max_tokens tokens (median of `reps`), in
    units of `token_seconds` (one plain greedy token). Leviathan's bound takes every v as 1; on a CPU
    a forward over a few tokens costs more than one, and not monotonically (kernels differ by shape)."""
    if len(prompt) <= max_tokens or token_seconds <= 0:
        raise ValueError(f"need a prompt longer than {max_tokens} tokens and a plain token time > 0")
    device = next(target.parameters()).device
    cache = DynamicCache()
    start = len(prompt) - max_tokens
    target(input_ids=_ids(prompt[:start], device), cache=cache, use_cache=True, logits_to_keep=1)
    costs = []
    for n in range(1, max_tokens + 1):
        times = []
        for _ in range(reps):
            sync(device)
            began = time.perf_counter()
            target(input_ids=_ids(prompt[start:start + n], device), cache=cache, use_cache=True, logits_to_keep=n)
            sync(device)
            times.append(time.perf_counter() - began)
            _crop(cache, start)
        costs.append(sorted(times)[reps // 2] / token_seconds)
    return costs


def step_costs(forwards: Sequence[float], bare_step: float) -> list[float]:
    """One loop step verifying n tokens, in plain tokens: the bare forward over n (`forwards[n - 1]`) plus
    the loop's own work per step (argmax, cache crops, tensors), which is what the loop drafting nothing
    costs per token (`bare_step`) beyond its one-token forward. Without it a 0.84 forward would promise
    a 1.19x speedup from not drafting at all."""
    overhead = max(0.0, bare_step - forwards[0])
    return [v + overhead for v in forwards]


def banned_ids(config) -> tuple[int, ...]:
    """The ids transformers masks for the whole run: EOS when min_new_tokens forces max_new_tokens."""
    eos = config.eos_token_id
    if eos is None or (config.min_new_tokens or 0) < config.max_new_tokens:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def time_speculative(target, draft, prompts: Sequence[Sequence[int]], config, length: int,
                     progress: Callable[[str], None] | None = None, shape: TreeShape = CHAIN) -> GenRun:
    """Timed `speculative_greedy` over every prompt, after one untimed warm-up call (as `time_assisted`);
    a feature draft with a tree `shape` verifies a draft tree (`feature_tree_greedy`)."""
    if (config.min_new_tokens or 0) < config.max_new_tokens:
        raise ValueError("the own loop generates exactly max_new_tokens: set min_new_tokens = max_new_tokens")
    banned = banned_ids(config)
    device = next(target.parameters()).device
    if not shape.is_chain and not isinstance(draft, FeatureDraft):
        raise ValueError("a draft tree is built around a feature draft's guesses: use --draft features")
    if not shape.is_chain:
        def decode(t, d, p, new, k, b):
            return feature_tree_greedy(t, d, p, new, k, shape, b)
    else:
        decode = feature_speculative_greedy if isinstance(draft, FeatureDraft) else speculative_greedy
    decode(target, draft, prompts[0], WARMUP_TOKENS, length, banned)
    run = GenRun(1)
    total: Acceptance | None = None
    for k, prompt in enumerate(prompts):
        sync(device)
        start = time.perf_counter()
        out = decode(target, draft, prompt, config.max_new_tokens, length, banned)
        sync(device)
        run.seconds += time.perf_counter() - start
        run.tokens += len(out.tokens)
        run.calls += 1
        run.outputs.append(out.tokens)
        total = out.acceptance if total is None else total + out.acceptance
        run.split["target_s"] = run.split.get("target_s", 0.0) + out.target_seconds
        run.split["draft_s"] = run.split.get("draft_s", 0.0) + out.draft_seconds
        run.split["first_call_s"] = run.split.get("first_call_s", 0.0) + out.first_seconds
        run.split["verify_calls"] = run.split.get("verify_calls", 0) + out.target_calls - 1
        if progress:
            progress(f"prompt {k + 1}/{len(prompts)}: {run.tokens / run.seconds:.1f} tokens/s so far")
    run.acceptance = total
    return run


LOOPS = ("own", "transformers")  # own: this module's loop; transformers: assisted generation


def time_drafted(loop: str, target, draft, prompts: Sequence[Sequence[int]], config, length: int,
                 tokenizers: tuple | None = None, progress: Callable[[str], None] | None = None,
                 shape: TreeShape = CHAIN) -> GenRun:
    """P drafted `length` tokens a step by `draft` (or a draft tree of `shape`: own loop, feature draft),
    timed with the chosen loop (same tokens either way)."""
    if loop == "own":
        if tokenizers is not None:
            raise ValueError("the own loop needs the draft to share the target's token space: use --loop transformers")
        return time_speculative(target, draft, prompts, config, length, progress, shape)
    if loop == "transformers":
        if not shape.is_chain:
            raise ValueError("a draft tree runs in the own loop only")
        if isinstance(draft, FeatureDraft):
            raise ValueError("a feature draft reads the private model's features: only the own loop runs it")
        return time_assisted(target, draft, prompts, fixed_draft_length(config, length), tokenizers=tokenizers,
                             progress=progress)
    raise ValueError(f"loop {loop!r} is not one of {', '.join(LOOPS)}")
