"""Contamination check: how much of HumanEval appears in a text corpus (the public transfer set).

Word 13-grams, as GPT-3's contamination study used: a problem counts as overlapping when any
13-gram of its prompt + canonical solution occurs in the corpus. Whitespace-split words, so
formatting differences do not hide a copy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tools.humaneval.data import Problem

N = 13


def ngrams(text: str, n: int = N) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Overlap:
    problems: int
    overlapping: list[str]  # task ids with at least one shared n-gram
    shared_ngrams: int  # HumanEval n-grams found in the corpus
    total_ngrams: int

    def to_dict(self) -> dict:
        return {"n": N, "problems": self.problems, "overlapping_problems": len(self.overlapping),
                "overlapping_task_ids": self.overlapping, "shared_ngrams": self.shared_ngrams,
                "total_ngrams": self.total_ngrams}


def overlap(corpus: Iterable[str], problems: list[Problem], n: int = N) -> Overlap:
    """Problems of `problems` whose prompt + solution share a word n-gram with any text of `corpus`."""
    seen: set[tuple[str, ...]] = set()
    for text in corpus:
        seen |= ngrams(text, n)
    hits, shared, total = [], 0, 0
    for prob in problems:
        grams = ngrams(prob.prompt + prob.canonical_solution, n)
        common = grams & seen
        total += len(grams)
        shared += len(common)
        if common:
            hits.append(prob.task_id)
    return Overlap(len(problems), hits, shared, total)
