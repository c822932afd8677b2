"""One convergence run: a real mesh in one mode and seed, then each node's model scored per round.

The daemons keep every round's checkpoint (keep_checkpoints > rounds), so scoring happens after
the mesh stops and never competes with training for the CPU. What is scored is the model a site
uses: the private model (adaptive/static: `private.*` tensors of the checkpoint; fedavg/local:
the whole model) on HumanEval prompts + canonical solutions, in bits per byte.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.learning.models import build_model, load_state_tensors
from fednode.learning.pretrained import load_pretrained
from fednode.learning.tokenizer import build_tokenizer
from fednode.node.learner import PRETRAINED
from fednode.store.checkpoint import load_checkpoint
from tools.convergence.presets import Arm, Preset
from tools.harness import ProcessHarness
from tools.humaneval.data import Problem
from tools.humaneval.nll import solution_nll


@dataclass
class RoundPoint:
    round: int
    nll_bpb: float  # mean over nodes of HumanEval bits/byte
    val_loss: float  # mean over nodes of the journaled held-out loss after local training
    bytes_per_node: float  # cumulative bytes sent per node, mean over nodes
    wall_s: float  # seconds from the mesh's start to the last node committing this round
    level: float  # mean committed messenger level over nodes


@dataclass
class RunResult:
    arm: str
    seed: int
    points: list[RoundPoint] = field(default_factory=list)
    seconds: float = 0.0


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def run_arm(preset: Preset, arm: Arm, seed: int, workdir: Path, problems: list[Problem],
            progress: Callable[[str], None]) -> RunResult:
    started = time.monotonic()
    overrides = preset.overrides(arm.mode, arm.level, seed)
    with ProcessHarness(workdir, preset.nodes, overrides=overrides, seed=preset.data_seed,
                        code_bytes=preset.code_bytes, progress=progress) as h:
        h.start()
        t0 = time.time()
        h.wait_members(timeout=300)
        for r in range(1, preset.rounds + 1):
            h.wait_round(r, timeout=preset.round_timeout_s * 4 + 120)
            progress(f"{arm.label} seed {seed}: round {r}/{preset.rounds}")
        h.close()
        journals = {name: h.rounds(name) for name in h.names}
        data_dirs = {name: h.data_dir(name) for name in h.names}
    result = RunResult(arm.label, seed)
    nll = _score(preset, arm, seed, journals, data_dirs, problems, Path(workdir), progress)
    sent = {name: 0 for name in journals}
    for r in range(1, preset.rounds + 1):
        recs = {name: next((x for x in recs if x.round == r), None) for name, recs in journals.items()}
        for name, rec in recs.items():
            sent[name] += rec.bytes_sent if rec else 0
        present = [rec for rec in recs.values() if rec is not None]
        result.points.append(RoundPoint(
            round=r, nll_bpb=_mean([nll[(name, r)] for name in recs if (name, r) in nll]),
            val_loss=_mean([rec.loss_after for rec in present]),
            bytes_per_node=statistics.fmean(sent.values()),
            wall_s=max((rec.committed_unix_ms / 1000 - t0 for rec in present), default=math.nan),
            level=_mean([float(rec.level) for rec in present])))
    result.seconds = time.monotonic() - started
    return result


def _private_model(preset: Preset, seed: int, cache: Path):
    """A model of the private architecture to load checkpoints into (and its tokenizer)."""
    if preset.private in PRETRAINED:
        model, tok = load_pretrained(preset.private, cache / "models")
        return model.float(), tok
    tok = build_tokenizer(cache / "tokenizers", vocab_size=4096)
    return build_model(preset.private, tok, seed=seed), tok


def _score(preset: Preset, arm: Arm, seed: int, journals: dict[str, list], data_dirs: dict[str, Path],
           problems: list[Problem], workdir: Path, progress: Callable[[str], None]) -> dict[tuple[str, int], float]:
    """HumanEval bits/byte of every node's model after every committed round."""
    model, tok = _private_model(preset, seed, workdir / "cache")
    scores: dict[tuple[str, int], float] = {}
    messenger_mode = arm.mode in ("adaptive", "static")
    for name, recs in journals.items():
        for rec in recs:
            if rec.round > preset.rounds:
                continue
            tensors, _meta = load_checkpoint(data_dirs[name] / "checkpoints" / rec.checkpoint, rec.checkpoint_sha256)
            if messenger_mode:
                tensors = {k[8:]: v for k, v in tensors.items() if k.startswith("private.")}
            load_state_tensors(model, tensors)
            scores[(name, rec.round)] = solution_nll(model, tok, problems).bits_per_byte
        progress(f"{arm.label} seed {seed}: scored {name}")
    return scores


def arm_summary(run: RunResult) -> dict[str, Any]:
    return {"arm": run.arm, "seed": run.seed, "seconds": run.seconds,
            "rounds": [p.__dict__ for p in run.points]}
