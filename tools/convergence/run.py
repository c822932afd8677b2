"""One convergence run: a mesh in one mode and seed, then each node's models scored per round.

The mesh is real daemons (ProcessHarness) or the real daemon code in one process over the
transport twin (SimHarness, preset harness = "sim"). The daemons keep every round's checkpoint
(keep_checkpoints > rounds), so scoring happens after the mesh stops and never competes with
training for the CPU. What is scored is what a site could use: the private model P (adaptive/
static: `private.*` tensors; fedavg/local: the whole model) and, for the distilled family, the
merged messenger M and the P+M ensemble, on HumanEval prompts + canonical solutions, in bits
per byte, at the preset's scored rounds. The lora family's P is the base with both adapters
merged in. With `pass_at_1`, P's greedy completions at the last round are also run against the
tests (pass@1, real execution).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednode.learning import lora, messenger
from fednode.learning.models import build_model, load_state_tensors
from fednode.learning.optim_state import model_tensors
from fednode.learning.pretrained import load_pretrained
from fednode.learning.tokenizer import build_tokenizer
from fednode.node.learner import PRETRAINED
from fednode.store.checkpoint import load_checkpoint
from tools.convergence.presets import Arm, Preset
from tools.harness import ProcessHarness
from tools.harness.sim import SimHarness, sim_configs
from tools.humaneval.data import Problem
from tools.humaneval.nll import EnsembleLM, solution_nll


@dataclass
class RoundPoint:
    round: int
    nll_bpb: float  # mean over nodes of HumanEval bits/byte
    val_loss: float  # mean over nodes of the journaled held-out loss after local training
    bytes_per_node: float  # cumulative bytes sent per node, mean over nodes
    wall_s: float  # seconds from the mesh's start to the last node committing this round
    level: float  # mean committed messenger level over nodes
    nll_m: float = math.nan  # merged messenger M (distilled family), bits/byte
    nll_ens: float = math.nan  # P+M ensemble
    pass1: float = math.nan  # greedy pass@1 of P (presets with pass_at_1, last round only)


@dataclass
class RunResult:
    arm: str
    seed: int
    points: list[RoundPoint] = field(default_factory=list)
    seconds: float = 0.0
    decisions: dict[str, list] = field(default_factory=dict)  # negotiation, per node and round (sim)
    refusals: dict[str, dict[str, int]] = field(default_factory=dict)  # per node: refused inputs by reason (sim)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def _mesh_process(preset: Preset, overrides: dict, workdir: Path, label: str, seed: int,
                  progress: Callable[[str], None]) -> tuple[dict, dict, float, dict]:
    """Real daemon processes: journals, data dirs, start time (decisions and refusals are not read)."""
    with ProcessHarness(workdir, preset.nodes, overrides=overrides, seed=preset.data_seed,
                        code_bytes=preset.code_bytes, progress=progress) as h:
        h.start()
        h.wait_members(timeout=300)
        t0 = time.time()
        for r in range(1, preset.rounds + 1):
            h.wait_round(r, timeout=preset.round_timeout_s * 4 + 120)
            progress(f"{label} seed {seed}: round {r}/{preset.rounds}")
        h.close()
        return ({name: h.rounds(name) for name in h.names}, {name: h.data_dir(name) for name in h.names}, t0,
                {"decisions": {}, "refusals": {}})


def _mesh_sim(preset: Preset, overrides: dict, workdir: Path, label: str, seed: int,
              progress: Callable[[str], None]) -> tuple[dict, dict, float, dict]:
    overrides = {**overrides, "train": {**overrides["train"], "threads": 1}}
    configs = sim_configs(workdir, preset.nodes, overrides=overrides, code_bytes=preset.code_bytes)

    async def drive() -> tuple[dict, dict, float, dict]:
        decisions: dict[str, list] = {}  # node -> [[round, decision, mesh JS], ...]
        refusals: dict[str, dict[str, int]] = {}  # node -> reason -> count (an honest mesh: {})
        async with SimHarness(configs) as h:
            h.start()
            await h.wait_started()
            await h.wait_members(timeout=300)
            t0 = time.time()
            for r in range(1, preset.rounds + 1):
                await h.wait_round(r, timeout=preset.round_timeout_s * 4 + 120)
                progress(f"{label} seed {seed}: round {r}/{preset.rounds}")
            for name in h.names:  # why adaptive grew or held, round by round
                daemon = h.daemons[name]
                if getattr(daemon, "negotiator", None) is not None:
                    decisions[name] = [list(d) for d in daemon.negotiator.decisions]
                if daemon.ctx is not None:
                    refusals[name] = daemon.ctx.metrics.refusals()
            await h.close()
            return ({name: h.rounds(name) for name in h.names},
                    {name: h.configs[name].node.data_dir for name in h.names}, t0,
                    {"decisions": decisions, "refusals": refusals})

    return asyncio.run(drive())


def run_arm(preset: Preset, arm: Arm, seed: int, workdir: Path, problems: list[Problem],
            progress: Callable[[str], None]) -> RunResult:
    started = time.monotonic()
    overrides = preset.overrides(arm.mode, arm.level, seed, arm.family, arm.ablation)
    mesh = _mesh_sim if preset.harness == "sim" else _mesh_process
    journals, data_dirs, t0, observed = mesh(preset, overrides, Path(workdir), arm.label, seed, progress)
    result = RunResult(arm.label, seed)
    nll = _score(preset, arm, seed, journals, data_dirs, problems, Path(workdir), progress)
    sent = {name: 0 for name in journals}
    for r in range(1, preset.rounds + 1):
        recs = {name: next((x for x in recs if x.round == r), None) for name, recs in journals.items()}
        for name, rec in recs.items():
            sent[name] += rec.bytes_sent if rec else 0
        present = [rec for rec in recs.values() if rec is not None]

        def scored(kind: str, _r=r, _recs=recs) -> float:
            return _mean([nll[(name, _r)][kind] for name in _recs if (name, _r) in nll])

        result.points.append(RoundPoint(
            round=r, nll_bpb=scored("P"), val_loss=_mean([rec.loss_after for rec in present]),
            bytes_per_node=statistics.fmean(sent.values()),
            wall_s=max((rec.committed_unix_ms / 1000 - t0 for rec in present), default=math.nan),
            level=_mean([float(rec.level) for rec in present]), nll_m=scored("M"), nll_ens=scored("ens"),
            pass1=scored("pass1")))
    result.seconds = time.monotonic() - started
    result.decisions, result.refusals = observed["decisions"], observed["refusals"]
    return result


def _private_model(preset: Preset, seed: int, cache: Path):
    """A model of the private architecture to load checkpoints into (and its tokenizer)."""
    if preset.private in PRETRAINED:
        model, tok = load_pretrained(preset.private, cache / "models")
        return model.float(), tok
    tok = build_tokenizer(cache / "tokenizers", vocab_size=4096)
    return build_model(preset.private, tok, seed=seed), tok


def _score(preset: Preset, arm: Arm, seed: int, journals: dict[str, list], data_dirs: dict[str, Path],
           problems: list[Problem], workdir: Path,
           progress: Callable[[str], None]) -> dict[tuple[str, int], dict[str, float]]:
    """HumanEval bits/byte of every node's P (and M, P+M for the distilled family) at the scored rounds."""
    model, tok = _private_model(preset, seed, workdir / "cache")
    pristine = {k: v.clone() for k, v in model.state_dict().items()} if arm.family == "lora" else {}
    ladder = messenger.LADDERS.get(preset.ladder) if preset.ladder else None
    with_m = preset.score_messenger and arm.messenger and arm.family == "distilled" and ladder is not None
    wanted = set(preset.rounds_scored())
    scores: dict[tuple[str, int], dict[str, float]] = {}
    for name, recs in journals.items():
        for rec in recs:
            if rec.round > preset.rounds or rec.round not in wanted:
                continue
            tensors, _meta = load_checkpoint(data_dirs[name] / "checkpoints" / rec.checkpoint, rec.checkpoint_sha256)
            private = ({k[8:]: v for k, v in tensors.items() if k.startswith("private.")} if arm.messenger
                       else model_tensors(tensors))
            if arm.family == "lora" and arm.messenger:  # the base with both adapters merged into its weights
                model.load_state_dict(pristine)
                ranks = tuple(int(r) for r in _meta.get("lora_ranks", "").split(",") if r)
                scored_model = lora.merged_model(model, private, ranks[-1], int(_meta.get("lora_private_rank", "0")),
                                                 with_private=True)
            else:
                load_state_tensors(model, private)
                scored_model = model
            point = {"P": solution_nll(scored_model, tok, problems).bits_per_byte, "M": math.nan, "ens": math.nan,
                     "pass1": math.nan}
            if preset.pass_at_1 and rec.round == preset.rounds:
                point["pass1"] = _pass_at_1(scored_model, tok, problems, seed)
            if with_m:
                m = messenger.build_messenger(ladder, rec.level, tok, seed)
                load_state_tensors(m, {k[10:]: v for k, v in tensors.items() if k.startswith("messenger.")})
                point["M"] = solution_nll(m, tok, problems).bits_per_byte
                point["ens"] = solution_nll(EnsembleLM(model, m), tok, problems).bits_per_byte
            scores[(name, rec.round)] = point
        progress(f"{arm.label} seed {seed}: scored {name}")
    return scores


def _pass_at_1(model, tok, problems: list[Problem], seed: int) -> float:
    """Greedy pass@1 of `model`: one completion per problem, run against its tests (supervised
    subprocesses with a time limit, as `fednode-bench humaneval passk`)."""
    from tools.humaneval.execute import check_many
    from tools.humaneval.generate import generate_completions

    outs = generate_completions(model, tok, [p.prompt for p in problems], n_samples=1, temperature=0.0,
                                max_new_tokens=256, batch_size=8, seed=seed)
    results = check_many([(p, o[0]) for p, o in zip(problems, outs, strict=True)])
    return sum(r.passed for r in results) / max(1, len(results))


def arm_summary(run: RunResult) -> dict[str, Any]:
    return {"arm": run.arm, "seed": run.seed, "seconds": run.seconds,
            "rounds": [p.__dict__ for p in run.points], "decisions": run.decisions, "refusals": run.refusals}
