"""Quality and speed of every model of one site at one round (the rows of the frontier).

Quality: HumanEval bits/byte of the canonical solutions given their prompts (all problems by
default). Speed: greedy tokens/s on the same prompts at each batch size (assisted generation at
batch 1 only, transformers' limit), the drafted output checked token for token against P's. A
drafted P has P's quality exactly when its output is identical, which is checked, not assumed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tools.frontier.ensemble import time_ensemble
from tools.frontier.models import Site
from tools.humaneval.data import Problem
from tools.humaneval.nll import EnsembleLM, solution_nll
from tools.throughput import metrics
from tools.throughput.draft_length import calibrate, estimate_alpha
from tools.throughput.generation import GenRun, fixed_draft_length, greedy_config, time_assisted, time_plain

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    batch_sizes: tuple[int, ...]
    max_new_tokens: int


DEGENERATE = 0.25  # P's greedy output with fewer distinct tokens than this fraction repeats itself


def distinct_fraction(outputs: Sequence[Sequence[int]]) -> float:
    """Mean over outputs of distinct tokens / tokens: near 0 when P repeats one token (a tiny model's
    '\\n\\n\\n...'), which any draft predicts, so its acceptance says nothing about the draft."""
    parts = [len(set(o)) / len(o) for o in outputs if o]
    return sum(parts) / len(parts) if parts else 0.0


def _row(model: str, bpb: float, runs: dict[int, GenRun], sizes: Sequence[int], **extra: Any) -> dict[str, Any]:
    return {"model": model, "bpb": bpb,
            "tokens_per_s": {str(bs): (runs[bs].tokens_per_s if bs in runs else None) for bs in sizes}, **extra}


def measure_site(site: Site, tok, problems: Sequence[Problem], prompts: list[list[int]],
                 calibration: list[list[int]], settings: Settings, say: Progress) -> list[dict[str, Any]]:
    """Rows for P, M, P+M (distilled) and P drafted by M, each with bits/byte and tokens/s per batch size."""
    sizes = settings.batch_sizes
    config = greedy_config(tok, settings.max_new_tokens)
    pad = config.pad_token_id
    p, m = site.private, site.messenger
    p_bpb = solution_nll(p, tok, problems).bits_per_byte
    p_runs = {bs: time_plain(p, prompts, bs, config) for bs in sizes}
    variety = None if 1 not in p_runs else distinct_fraction(p_runs[1].outputs)
    rows = [_row("P", p_bpb, p_runs, sizes, distinct=variety)]
    if m is None:
        return rows
    m_bpb = solution_nll(m, tok, problems).bits_per_byte
    m_runs = {bs: time_plain(m, prompts, bs, config) for bs in sizes}
    rows.append(_row("M", m_bpb, m_runs, sizes))
    if site.family == "distilled":
        ens_bpb = solution_nll(EnsembleLM(p, m), tok, problems).bits_per_byte
        rows.append(_row("P+M", ens_bpb, {bs: time_ensemble(p, m, prompts, bs, settings.max_new_tokens, pad)
                                          for bs in sizes}, sizes))
    plain = p_runs.get(1) or time_plain(p, prompts, 1, config)
    alone = m_runs.get(1) or time_plain(m, prompts, 1, config)
    cost = plain.tokens_per_s / alone.tokens_per_s
    chosen = calibrate(p, m, calibration, config, cost)
    length = max(1, chosen["length"])
    assisted = time_assisted(p, m, prompts, fixed_draft_length(config, length))
    identity = metrics.compare_outputs(plain.outputs, assisted.outputs)
    alpha = estimate_alpha(assisted.acceptance, length)
    say(f"round {site.round}: P {p_bpb:.3f} bpb, M (level {site.level}) {m_bpb:.3f}; P drafted by M "
        f"{assisted.tokens_per_s / plain.tokens_per_s:.2f}x (length {length}, alpha {alpha}, c {cost:.2f})")
    rows.append(_row("P<-M", p_bpb, {1: assisted}, sizes, identical=identity.identical,
                     distinct=distinct_fraction(plain.outputs),
                     speedup=assisted.tokens_per_s / plain.tokens_per_s, alpha=alpha, cost=cost,
                     draft_length=length, chosen_length=chosen["length"],
                     bound=None if alpha is None else metrics.speedup_bound(alpha, length, cost)))
    return rows
