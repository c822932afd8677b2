"""Where a convergence run keeps its checkpoints: `WORKDIR/<arm>-seed<N>/<node>/state/checkpoints/`.

`fednode-bench convergence --workdir WORKDIR` keeps every round's checkpoint of every node
(keep_checkpoints > rounds); a round checkpoint is `round-NNNNNNNN.safetensors` (the
`.shared.` file beside it is what travels, not the site's model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tools.throughput.errors import BenchFailure

_RUN = re.compile(r"(?P<arm>.+)-seed(?P<seed>\d+)")
_ROUND = re.compile(r"round-(\d{8,})\.safetensors")
HINT = "pass the --workdir of a `fednode-bench convergence` run (it keeps <arm>-seed<N>/<node>/state/checkpoints)"


@dataclass(frozen=True)
class RunDir:
    arm: str
    seed: int
    path: Path

    def nodes(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if (p / "state" / "checkpoints").is_dir())

    def checkpoints(self, node: str) -> dict[int, Path]:
        """round -> checkpoint path of one node."""
        directory = self.path / node / "state" / "checkpoints"
        found = {}
        for path in directory.iterdir() if directory.is_dir() else ():
            m = _ROUND.fullmatch(path.name)
            if m and path.is_file():
                found[int(m.group(1))] = path
        return found


def find_runs(workdir: Path) -> list[RunDir]:
    """Every arm-and-seed run under workdir that kept checkpoints, by arm then seed."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise BenchFailure(f"--from-run {workdir} is not a directory: {HINT}")
    runs = []
    for path in sorted(workdir.iterdir()):
        m = _RUN.fullmatch(path.name)
        if m and path.is_dir():
            run = RunDir(m.group("arm"), int(m.group("seed")), path)
            if run.nodes():
                runs.append(run)
    if not runs:
        raise BenchFailure(f"--from-run {workdir} holds no <arm>-seed<N> run with checkpoints: {HINT}")
    return runs


def rounds_to_measure(available: list[int], every: int) -> list[int]:
    """Every `every`-th round that exists, and the last one (the run's end state is always measured)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not available:
        return []
    last = max(available)
    return sorted({r for r in available if r % every == 0} | {last})
