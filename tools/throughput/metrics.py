"""Pure decisions of the throughput benchmark: no models, no clocks, no I/O (so they are tested alone)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

SPEEDUP_USEFUL = 1.5  # below this, drafting is not worth its extra model on a site


def tokens_per_second(tokens: int, seconds: float) -> float:
    """Generated (or trained) tokens over wall seconds; ValueError on a non-positive time."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    return tokens / seconds


def draft_speedup(assisted_tps: float | None, plain_tps: float | None) -> float | None:
    """Assisted tokens/s over plain tokens/s of the same model, prompts and lengths (None if unknown)."""
    if assisted_tps is None or plain_tps is None:
        return None
    if plain_tps <= 0:
        raise ValueError(f"plain tokens/s must be > 0, got {plain_tps}")
    return assisted_tps / plain_tps


def speedup_verdict(speedup: float | None) -> str:
    """One honest sentence about a draft speedup."""
    if speedup is None:
        return "not measured"
    if speedup < 1.0:
        return f"slower: drafting makes generation {1 / speedup:.2f}x slower"
    if speedup < SPEEDUP_USEFUL:
        return f"below {SPEEDUP_USEFUL}x: drafting gains too little to be worth a second model"
    return f"useful: drafting makes generation {speedup:.2f}x faster"


@dataclass(frozen=True)
class Acceptance:
    """How the draft fared in assisted generation, from the target model's forward calls.

    Every target call verifies `proposed_i` draft tokens and adds `accepted_i + 1` tokens (the
    accepted prefix plus the target's own next token), so accepted = new tokens - target calls.
    """

    target_calls: int
    proposed: int
    accepted: int
    new_tokens: int

    @property
    def rate(self) -> float | None:
        """Accepted over proposed draft tokens (None when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else None

    @property
    def tokens_per_target_call(self) -> float | None:
        """New tokens per target forward (1.0 = plain greedy; the ceiling of any speedup)."""
        return self.new_tokens / self.target_calls if self.target_calls else None

    def __add__(self, other: Acceptance) -> Acceptance:
        return Acceptance(self.target_calls + other.target_calls, self.proposed + other.proposed,
                          self.accepted + other.accepted, self.new_tokens + other.new_tokens)

    def as_dict(self) -> dict[str, float | int | None]:
        return {"target_calls": self.target_calls, "draft_tokens_proposed": self.proposed,
                "draft_tokens_accepted": self.accepted, "acceptance_rate": self.rate,
                "tokens_per_target_call": self.tokens_per_target_call}


def acceptance(target_input_lengths: Sequence[int], prompt_len: int, new_tokens: int) -> Acceptance:
    """Acceptance of one assisted generation from the sequence lengths the target model was fed.

    The first call sees the prompt plus the first draft; each later call sees the last accepted
    token plus the new draft, so its draft is length - 1.
    """
    if not target_input_lengths:
        raise ValueError("no target forward call was recorded")
    if target_input_lengths[0] < prompt_len:
        raise ValueError(f"first target call saw {target_input_lengths[0]} tokens, "
                         f"fewer than the prompt's {prompt_len}")
    proposed = (target_input_lengths[0] - prompt_len) + sum(n - 1 for n in target_input_lengths[1:])
    calls = len(target_input_lengths)
    accepted = new_tokens - calls
    if accepted < 0 or accepted > proposed:
        raise ValueError(f"{new_tokens} new tokens from {calls} target calls and {proposed} draft tokens is impossible")
    return Acceptance(calls, proposed, accepted, new_tokens)


@dataclass(frozen=True)
class Identity:
    """Whether assisted outputs equal plain greedy outputs, prompt by prompt."""

    compared: int
    mismatches: int
    first_mismatch: dict[str, int] | None  # {"prompt": i, "position": new-token index}

    @property
    def identical(self) -> bool:
        return self.compared > 0 and self.mismatches == 0


def compare_outputs(plain: Sequence[Sequence[int]], assisted: Sequence[Sequence[int]]) -> Identity:
    """Count prompts whose assisted new tokens differ from the plain greedy ones (length included)."""
    if len(plain) != len(assisted):
        raise ValueError(f"{len(plain)} plain outputs but {len(assisted)} assisted ones")
    mismatches, first = 0, None
    for i, (a, b) in enumerate(zip(plain, assisted, strict=True)):
        if list(a) == list(b):
            continue
        mismatches += 1
        if first is None:
            pos = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            first = {"prompt": i, "position": pos}
    return Identity(len(plain), mismatches, first)


def make_batches(n_prompts: int, batch_size: int) -> list[list[int]]:
    """Prompt indices in batches of exactly batch_size, wrapping round to fill the last batch.

    Every batch is full, so tokens/s at a batch size measures that batch size; with fewer
    prompts than the batch size the prompts repeat (the report says so).
    """
    if n_prompts < 1 or batch_size < 1:
        raise ValueError(f"n_prompts ({n_prompts}) and batch_size ({batch_size}) must be >= 1")
    n_batches = -(-n_prompts // batch_size)
    order = [i % n_prompts for i in range(n_batches * batch_size)]
    return [order[k : k + batch_size] for k in range(0, len(order), batch_size)]


def param_ratio(private_params: int, messenger_params: int) -> float:
    if messenger_params <= 0:
        raise ValueError("messenger has no parameters")
    return private_params / messenger_params


def pick_draft_level(level_params: Sequence[int], private_params: int, min_ratio: float) -> int:
    """The largest ladder level the private model still out-sizes by min_ratio, else level 0.

    The largest such level is the best drafter that keeps the size gap the issue asks for.
    """
    fitting = [lv for lv, n in enumerate(level_params) if private_params >= min_ratio * n]
    return max(fitting) if fitting else 0


def truncate_prompt(ids: Sequence[int], keep: int) -> list[int]:
    """The last `keep` prompt tokens (the end of a HumanEval prompt is what the completion follows)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    return list(ids[-keep:])


def speedup_bound(alpha: float, gamma: int, cost: float) -> float:
    """Leviathan et al.'s expected speedup of speculative decoding (their eq. for walltime improvement):
    (1 - alpha^(gamma+1)) / ((1 - alpha) (gamma c + 1)), for per-token acceptance `alpha`, `gamma`
    draft tokens per step and draft cost `c` (one draft forward over one target forward)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"acceptance must be in [0, 1], got {alpha}")
    if gamma < 0 or cost < 0:
        raise ValueError(f"gamma ({gamma}) and cost ({cost}) must be >= 0")
    expected = gamma + 1.0 if alpha == 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
    return expected / (gamma * cost + 1.0)


def best_draft_length(alpha: float, cost: float, max_gamma: int = 20) -> tuple[int, float]:
    """The draft length (0..max_gamma; 0 = do not draft) that maximises `speedup_bound`, and that bound:
    chosen from the measured acceptance and cost, not a constant."""
    best = max(range(max_gamma + 1), key=lambda g: (speedup_bound(alpha, g, cost), -g))
    return best, speedup_bound(alpha, best, cost)


def speedup_with_verify_cost(alpha: float, gamma: int, cost: float, verify: Sequence[float], width: int = 1,
                             nodes: int | None = None) -> float:
    """Leviathan's bound with the measured cost of one verification in place of 1: `verify[n - 1]` is
    one target forward over n tokens in plain target tokens (on a CPU it grows with n, and not
    monotonically: matrix kernels differ by shape). Drafting nothing (gamma 0) costs verify[0]. A draft
    tree of up to `width` nodes per depth verifies gamma * width + 1 tokens, or `nodes` + 1 under a cap
    (alpha: its effective acceptance)."""
    n = gamma * width if nodes is None else nodes
    if width < 1 or gamma < 0 or not 0 <= n < len(verify):
        raise ValueError(f"draft length {gamma} at width {width} needs the cost of verifying "
                         f"{n + 1} tokens; {len(verify)} measured")
    if any(not v > 0 for v in verify):
        raise ValueError(f"verification costs must be > 0, got {list(verify)}")
    expected = speedup_bound(alpha, gamma, 0.0)  # tokens per step
    return expected / (gamma * cost + verify[n])


def best_draft_length_measured(alpha: float, cost: float, verify: Sequence[float], width: int = 1,
                               nodes_of: Callable[[int], int] | None = None, longest: int | None = None
                               ) -> tuple[int, float]:
    """The length maximising `speedup_with_verify_cost` among those whose verification was measured (up to
    `longest`; `nodes_of(length)`: a capped tree's nodes), and that expected speedup over plain decoding
    (length 0 when no length beats not drafting)."""
    top = (len(verify) - 1) // max(width, 1) if longest is None else longest

    def expected(g: int) -> float:
        return speedup_with_verify_cost(alpha, g, cost, verify, width, None if nodes_of is None else nodes_of(g))

    best = max(range(top + 1), key=lambda g: (expected(g), -g))
    return best, expected(best)


def alpha_from_tokens_per_call(tokens_per_call: float, gamma: int) -> float:
    """Leviathan's per-token acceptance alpha from measured new tokens per target call at a constant
    draft length gamma: the alpha whose expected (1 - alpha^(gamma+1)) / (1 - alpha) matches (bisection).

    The plain accepted/proposed rate understates alpha (tokens after a rejection count as proposed)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if not 1.0 <= tokens_per_call <= gamma + 1.0:
        raise ValueError(f"tokens per target call {tokens_per_call} is outside 1..{gamma + 1} for gamma {gamma}")
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        expected = gamma + 1.0 if mid == 1.0 else (1.0 - mid ** (gamma + 1)) / (1.0 - mid)
        lo, hi = (mid, hi) if expected < tokens_per_call else (lo, mid)
    return (lo + hi) / 2
