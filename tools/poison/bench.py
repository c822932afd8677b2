"""`fednode-bench poison`: one insider in a small mesh, per aggregation rule (issue 11).

For each `[learning] aggregation` a clean mesh of N full nodes runs R rounds, then the same mesh
(same seeds, partitions, configs) where the last node is an attacker: it trains honestly on its own
partition but pushes a poisoned messenger every round. Everything else is the real daemon code over
the in-memory transport twin (tools.harness.sim): the receiver's header checks, validation, its
screen against its own state, the merge. So the figures measure the whole defence, not the
aggregator alone; an update the screen refuses never reaches the aggregator (counted apart).

Scores: every honest node's held-out loss after the last round, two of them: the private model P's
(journal `loss_after`, what a site keeps) and the merged messenger M's (the learner's held-out eval
after its last merge, what the attack targets first). Per (aggregation, attack): attacked / clean
of the same aggregation per honest node (worst node and mean), and whether the worst is within the
tolerance (5 %). Per aggregation: clean / clean-with-mean, the price of robustness on a clean mesh,
which is what chooses the default.

Rounds start only once every node sees the whole mesh (each node's round loop waits for it), so a
clean and an attacked run differ in what the attacker pushes and in nothing else.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tools.poison import AGGREGATIONS, ATTACKS, DEFAULT_ATTACKS, TOLERANCE

__all__ = ["AGGREGATIONS", "ATTACKS", "DEFAULT_ATTACKS", "TOLERANCE", "Options", "Setup", "analyse", "main",
           "poison", "pool", "ratios", "recommend", "run_mesh"]

REPLACEMENT_SCALE = -10.0  # "scaled": the round's start + this x the honest delta of the round
STEALTH_SCALE = -3.0  # "stealth": the same, small enough to pass a screen of 4 x one round's drift
NOISE_DELTAS = 3.0  # "noise": the honest state + Gaussian noise of this x the round's honest delta norm
HUGE_NORM = 1e5  # "huge": finite noise of this global norm (far outside every bound)

DESCRIPTIONS = {
    "scaled": f"model replacement: the round's start {REPLACEMENT_SCALE:+g} x the honest delta of the round",
    "stealth": f"the round's start {STEALTH_SCALE:+g} x the honest delta (inside a 4 x one round's drift screen)",
    "noise": f"the honest state + Gaussian noise of {NOISE_DELTAS:g} x the round's honest delta norm",
    "sign-flip": "the negated honest state (same norm): insider.py's sign-flipped push",
    "nan": "every coordinate NaN",
    "huge": f"Gaussian noise of global norm {HUGE_NORM:g} (finite)",
}


# ---------------------------------------------------------------------------- attacks (pure)


def _global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors.values()))


def _gaussian(tensors: Mapping[str, torch.Tensor], norm: float, generator: torch.Generator) -> dict:
    noise = {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in tensors.items()}
    scale = norm / max(_global_norm(noise), 1e-30)
    return {k: n * scale for k, n in noise.items()}


def _start(before: Mapping[str, torch.Tensor] | None, state: Mapping[str, torch.Tensor]) -> dict:
    """The round's start per tensor (zeros where unknown or of another shape)."""
    out = {}
    for k, v in state.items():
        b = before.get(k) if before is not None else None
        out[k] = b.double() if b is not None and b.shape == v.shape else torch.zeros_like(v, dtype=torch.float64)
    return out


def poison(attack: str, before: Mapping[str, torch.Tensor] | None, state: Mapping[str, torch.Tensor],
           seed: int, stealth_scale: float = STEALTH_SCALE) -> dict[str, torch.Tensor]:
    """What the attacker pushes instead of `state` (its honestly trained messenger); `before` is its
    state at the start of the round (None or another shape: the delta counts as the whole state)."""
    if attack in ("scaled", "stealth"):
        scale = REPLACEMENT_SCALE if attack == "scaled" else stealth_scale
        start = _start(before, state)
        return {k: (start[k] + scale * (v.double() - start[k])).to(v.dtype) for k, v in state.items()}
    if attack == "sign-flip":
        return {k: -v for k, v in state.items()}
    if attack == "nan":
        return {k: torch.full_like(v, math.nan) for k, v in state.items()}
    generator = torch.Generator().manual_seed(seed)
    if attack == "noise":
        start = _start(before, state)
        delta = _global_norm({k: v.double() - start[k] for k, v in state.items()})
        noise = _gaussian(state, NOISE_DELTAS * delta, generator)
        return {k: (v.double() + noise[k]).to(v.dtype) for k, v in state.items()}
    if attack == "huge":
        return {k: n.to(state[k].dtype) for k, n in _gaussian(state, HUGE_NORM, generator).items()}
    raise ValueError(f"unknown attack {attack!r}: use one of {', '.join(ATTACKS)}")


# ---------------------------------------------------------------------------- scoring (pure)


def _finite(values: Sequence[float]) -> bool:
    return bool(values) and all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def ratios(attacked: Mapping[str, float], clean: Mapping[str, float],
           tolerance: float = TOLERANCE) -> dict[str, Any]:
    """attacked / clean per node (the nodes both hold), their worst (largest) and mean, and whether
    the worst is within 1 + tolerance. A non-finite or missing loss makes the verdict False."""
    nodes = sorted(set(attacked) & set(clean))
    per = {}
    for n in nodes:
        a, c = attacked[n], clean[n]
        per[n] = a / c if _finite([a, c]) and c > 0 else math.nan
    values = list(per.values())
    ok = _finite(values) and len(nodes) == len(clean)
    worst = max(values) if ok else math.nan
    return {"per_node": per, "worst": worst, "mean": statistics.fmean(values) if ok else math.nan,
            "within": bool(ok and worst <= 1 + tolerance)}


def pool(results: Sequence[Mapping[str, Any]], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Several seeds' `ratios` in one: worst over every (seed, node), mean over all of them."""
    values = [v for r in results for v in r["per_node"].values()]
    ok = _finite(values)
    worst = max(values) if ok else math.nan
    return {"worst": worst, "mean": statistics.fmean(values) if ok else math.nan,
            "max_dev": max(abs(v - 1) for v in values) if ok else math.nan,  # either way: for a noise floor
            "within": bool(ok and results and all(r["within"] for r in results) and worst <= 1 + tolerance),
            "seeds": len(results)}


TIE = 0.01  # clean costs this close to the best are reported as tied (run-to-run noise is ~1-3 % on P)


def recommend(clean_cost: Mapping[str, Mapping[str, Any]], attacked: Mapping[str, Mapping[str, Mapping[str, Any]]],
              tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The default the figures support: among aggregations that hold every attack within tolerance
    (on both losses), the one with the lowest clean cost (worst clean / clean-mean); None when none
    holds; `tied` lists those whose clean cost is within TIE of the best (noise cannot order them).
    `clean_cost[agg] = {"loss": pooled, "shared_loss": pooled}`, `attacked[agg][attack]` alike."""
    holding = []
    for agg, by_attack in attacked.items():
        if by_attack and all(v["loss"]["within"] and v["shared_loss"]["within"] for v in by_attack.values()):
            cost = clean_cost.get(agg, {}).get("loss", {}).get("worst", math.nan)
            holding.append((cost if math.isfinite(cost) else math.inf, agg))
    if not holding:
        return {"aggregation": None, "holding": [], "tied": [],
                "why": f"no aggregation kept every honest node within {tolerance:.0%} under every attack"}
    holding.sort()
    cost, best = holding[0]
    tied = [a for c, a in holding[1:] if c <= cost + TIE]
    why = f"holds every attack within {tolerance:.0%}; clean cost (worst node, P loss) {cost:.4f} x mean"
    if tied:
        why += f"; tied within {TIE:.0%} of that cost: {', '.join(tied)}"
    return {"aggregation": best, "holding": [a for _, a in holding], "tied": tied, "why": why}


# ---------------------------------------------------------------------------- the mesh


@dataclass(frozen=True)
class Setup:
    nodes: int = 4
    rounds: int = 10
    preset: str = "micro"  # private model preset; the messenger ladder is the preset's own
    mode: str = "static"  # static level 0: no growth decisions to differ between runs
    steps_per_round: int = 4
    batch_size: int = 4
    seq_len: int = 64
    max_tokens: int = 12_000
    code_bytes: int = 40_000
    round_timeout_s: float = 15.0  # rounds take ~1-3 s; a refused push is waited for this long (3 rounds)
    stealth_scale: float = STEALTH_SCALE  # the "stealth" attack's multiple of the honest delta
    fanout: int = 2  # [mesh] fanout: peers each node pushes to per round (a receiver merges ~fanout + 1 states)

    def overrides(self, aggregation: str, seed: int) -> dict[str, dict[str, Any]]:
        return {
            "model": {"preset": self.preset, "seed": seed},
            "data": {"seq_len": self.seq_len, "max_tokens": self.max_tokens},
            "train": {"rounds": self.rounds, "steps_per_round": self.steps_per_round, "batch_size": self.batch_size,
                      "round_timeout_s": self.round_timeout_s, "keep_checkpoints": 2, "threads": 1,
                      "catchup_lag": 1000},  # nobody adopts anyone's state: every round is merged
            "learning": {"mode": self.mode, "static_level": 0, "curriculum": False, "aggregation": aggregation},
            "negotiation": {"min_live_peers": self.nodes},
            "mesh": {"fanout": self.fanout},
        }


@dataclass
class MeshRun:
    aggregation: str
    attack: str | None  # None: the clean mesh
    seed: int
    repeat: bool = False  # a second clean run of the same mesh: the run-to-run noise floor
    loss: dict[str, float] = field(default_factory=dict)  # honest node -> P held-out loss after the last round
    shared_loss: dict[str, float] = field(default_factory=dict)  # honest node -> merged M held-out loss
    attacker_pushes: int = 0  # pushes the attacker made (0 in the clean run)
    refused_at_push: int = 0  # ... that the receiver refused on arrival (validation: NaN, norm, shape)
    refused_at_merge: int = 0  # ... that arrived and the screen against own state refused
    attacker_merged: int = 0  # honest (node, round) merges that took the attacker's update
    honest_rounds: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mesh_classes():
    """The daemon and round loop used in the benchmark (imported lazily: `--help` stays instant)."""
    from fednode.learning.compress import decompress
    from fednode.node.daemon import Daemon
    from fednode.node.rounds import RoundLoop
    from tools.harness.sim import SimHarness

    class BenchRoundLoop(RoundLoop):
        """Waits for the whole mesh before round 1; as the attacker, pushes `poison(...)`."""

        def __init__(self, *args, mesh_size: int, attack: str | None, seed: int, stealth_scale: float):
            super().__init__(*args)
            self.mesh_size, self.attack, self.seed, self.stealth_scale = mesh_size, attack, seed, stealth_scale
            self.before: dict[str, torch.Tensor] | None = None
            self.poisoned: tuple[int, dict[str, torch.Tensor]] | None = None
            self.pushes = self.pushes_refused = 0

        async def run(self) -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 300
            while len(self.ctx.membership.alive()) < self.mesh_size - 1:
                if loop.time() > deadline:
                    raise TimeoutError(f"{self.ctx.node_id}: the mesh of {self.mesh_size} never formed")
                await asyncio.sleep(0.05)
            await super().run()

        async def run_round(self, round_: int) -> None:
            if self.attack is not None:
                self.before = {k: v.detach().clone() for k, v in self.learner.shared_state().items()}
            await super().run_round(round_)

        async def _push(self, member, wire, round_: int, deadline: float) -> int:
            if self.attack is not None:
                if self.poisoned is None or self.poisoned[0] != round_:  # the same poison to every target
                    state = decompress(*wire)  # its honest state, as its codec would have sent it
                    self.poisoned = (round_, poison(self.attack, self.before, state, self.seed * 7919 + round_,
                                                    self.stealth_scale))
                wire = (self.poisoned[1], {})  # the attacker sends float32, whatever the mesh's codec
            sent = await super()._push(member, wire, round_, deadline)
            self.pushes += 1
            self.pushes_refused += sent == 0  # the receiver refused it (or the deadline passed)
            return sent

    class BenchDaemon(Daemon):
        def __init__(self, cfg, factory, *, mesh_size: int, attack: str | None, seed: int, stealth_scale: float):
            super().__init__(cfg, factory)
            self.bench = {"mesh_size": mesh_size, "attack": attack, "seed": seed, "stealth_scale": stealth_scale}

        async def start(self):
            ctx = await super().start()
            self.rounds = BenchRoundLoop(ctx, self.learner, self.negotiator, **self.bench)
            return ctx

    class PoisonHarness(SimHarness):
        def __init__(self, configs, attacker: str | None, attack: str | None, seed: int, stealth_scale: float,
                     **kw):
            super().__init__(configs, **kw)
            self.attacker, self.attack, self.seed, self.stealth_scale = attacker, attack, seed, stealth_scale

        def start(self, names=None) -> None:
            for name in names or self.names:
                daemon = BenchDaemon(self.configs[name], self._factory, mesh_size=len(self.configs),
                                     attack=self.attack if name == self.attacker else None, seed=self.seed,
                                     stealth_scale=self.stealth_scale)
                self.daemons[name] = daemon
                self.tasks[name] = asyncio.create_task(daemon.serve(), name=f"node {name}")

    return PoisonHarness


def refusals(metrics, peer: str, stage: str) -> int:
    """How many of `peer`'s inputs a node refused at `stage` (its fednode_refused_peer_input counter)."""
    total = 0
    for metric in metrics.refused_input.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("peer") == peer \
                    and sample.labels.get("stage") == stage:
                total += int(sample.value)
    return total


def run_mesh(setup: Setup, aggregation: str, attack: str | None, seed: int, workdir: Path,
             progress: Callable[[str], None] = lambda _m: None, repeat: bool = False) -> MeshRun:
    """One mesh: `setup.nodes` nodes, the last the attacker when `attack` is set; R rounds."""
    from tools.harness.sim import sim_configs

    harness_cls = _mesh_classes()
    configs = sim_configs(Path(workdir), setup.nodes, overrides=setup.overrides(aggregation, seed),
                          code_bytes=setup.code_bytes, seeds=setup.nodes)
    names = [c.node.name for c in configs]
    attacker = names[-1]
    honest = names[:-1]  # the attacker's seat is honest in the clean run, but never scored
    label = f"{aggregation} / {attack or 'clean'} / seed {seed}"
    run = MeshRun(aggregation, attack, seed, repeat)
    started = time.monotonic()

    async def drive() -> None:
        async with harness_cls(configs, attacker if attack else None, attack, seed, setup.stealth_scale) as h:
            h.start()
            await h.wait_started()
            await h.wait_members(timeout=300)
            for r in range(1, setup.rounds + 1):
                await h.wait_round(r, timeout=setup.round_timeout_s * 4 + 120)
                progress(f"{label}: round {r}/{setup.rounds}")
            for name in honest:
                run.shared_loss[name] = float(h.daemons[name].learner.last_shared_loss)
                run.refused_at_merge += refusals(h.ctx(name).metrics, attacker, "merge")
            if attack:
                loop = h.daemons[attacker].rounds
                run.attacker_pushes, run.refused_at_push = loop.pushes, loop.pushes_refused
            await h.close()
        arrived = 0
        for name in honest:
            recs = [x for x in h.rounds(name) if x.round <= setup.rounds]
            last = next((x for x in recs if x.round == setup.rounds), None)
            run.loss[name] = float(last.loss_after) if last is not None else math.nan
            run.honest_rounds += len(recs)
            arrived += sum(attacker in x.merged_from for x in recs)  # merged_from: what arrived in time
        run.attacker_merged = max(arrived - run.refused_at_merge, 0) if attack else arrived

    asyncio.run(drive())
    run.seconds = time.monotonic() - started
    return run


# ---------------------------------------------------------------------------- the benchmark


@dataclass
class Options:
    setup: Setup
    seeds: tuple[int, ...]
    aggregations: tuple[str, ...]
    attacks: tuple[str, ...]
    out: Path
    command: str
    tolerance: float = TOLERANCE
    repeat: bool = True  # rerun the clean mean mesh per seed: how far two identical runs differ


def analyse(runs: Sequence[MeshRun], aggregations: Sequence[str], attacks: Sequence[str], seeds: Sequence[int],
            tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Figures from the runs: per (aggregation, attack) attacked / clean of the same aggregation, per
    aggregation clean / clean-mean, and the recommended default (pure: no I/O)."""
    by = {(r.aggregation, r.attack, r.seed): r for r in runs if not r.repeat}
    repeats = {r.seed: r for r in runs if r.repeat and r.aggregation == "mean" and r.attack is None}
    noise = None
    if repeats and all(s in repeats for s in seeds) and "mean" in aggregations:
        noise = {kind: pool([ratios(getattr(repeats[s], kind), getattr(by[("mean", None, s)], kind), tolerance)
                             for s in seeds], tolerance) for kind in ("loss", "shared_loss")}
    attacked: dict[str, dict[str, Any]] = {}
    cost: dict[str, dict[str, Any]] = {}
    for agg in aggregations:
        if "mean" in aggregations:
            cost[agg] = {kind: pool([ratios(getattr(by[(agg, None, s)], kind), getattr(by[("mean", None, s)], kind),
                                            tolerance) for s in seeds], tolerance)
                         for kind in ("loss", "shared_loss")}
        attacked[agg] = {}
        for attack in attacks:
            cell: dict[str, Any] = {}
            for kind in ("loss", "shared_loss"):
                cell[kind] = pool([ratios(getattr(by[(agg, attack, s)], kind), getattr(by[(agg, None, s)], kind),
                                          tolerance) for s in seeds], tolerance)
                if "mean" in aggregations:  # end to end: against the clean mesh of today's default
                    cell[f"{kind}_vs_clean_mean"] = pool(
                        [ratios(getattr(by[(agg, attack, s)], kind), getattr(by[("mean", None, s)], kind), tolerance)
                         for s in seeds], tolerance)
            for key in ("attacker_pushes", "refused_at_push", "refused_at_merge", "attacker_merged", "honest_rounds"):
                cell[key] = sum(getattr(by[(agg, attack, s)], key) for s in seeds)
            cell["within"] = cell["loss"]["within"] and cell["shared_loss"]["within"]
            attacked[agg][attack] = cell
    return {"attacked": attacked, "clean_cost": cost, "noise_floor": noise,
            "recommendation": recommend(cost, attacked, tolerance) if cost else None}


def describe(attack: str, setup: Setup) -> str:
    if attack == "stealth" and setup.stealth_scale != STEALTH_SCALE:
        return f"the round's start {setup.stealth_scale:+g} x the honest delta"
    return DESCRIPTIONS[attack]


def _losses(values: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())


def _fmt(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.4f}"


def markdown(opts: Options, meta: dict[str, Any], figures: dict[str, Any], runs: Sequence[MeshRun]) -> str:
    from tools import report

    s = opts.setup
    lines = [
        "# Insider poisoning: one attacker, per aggregation", "",
        f"Command: `{meta['command']}`  ", f"Date: {meta['date_utc']}  ",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores "
        f"(load {meta['machine']['load_avg_1m']})  ",
        f"Code: {meta['code']['commit'][:12]}" + (f" + uncommitted {', '.join(meta['code']['uncommitted'])}"
                                                  if meta['code']['uncommitted'] else ""),
        "",
        f"{s.nodes} nodes (the last one the attacker in attacked runs), {s.rounds} rounds, `{s.preset}` private model "
        f"with its distilled messenger ladder, `{s.mode}` mode level 0, {s.steps_per_round} steps x batch "
        f"{s.batch_size} x seq {s.seq_len} per round, fanout {s.fanout}, seeds {list(opts.seeds)}. Ratios are over "
        f"the {s.nodes - 1} honest nodes: P = private model's held-out loss (journal), M = merged messenger's "
        f"held-out loss, after round {s.rounds}. Within: worst honest node <= {1 + opts.tolerance:g} x clean, P and M.",
        "", "## Under attack: attacked / clean (same aggregation)", ""]
    rows = []
    for agg, by_attack in figures["attacked"].items():
        for attack, c in by_attack.items():
            rows.append([agg, attack, _fmt(c["loss"]["worst"]), _fmt(c["loss"]["mean"]),
                         _fmt(c["shared_loss"]["worst"]), _fmt(c["shared_loss"]["mean"]),
                         _fmt(c.get("loss_vs_clean_mean", {}).get("worst")),
                         f"{c['refused_at_push']}/{c['refused_at_merge']}/{c['attacker_merged']}",
                         c["within"]])
    lines.append(report.markdown_table(["aggregation", "attack", "P worst", "P mean", "M worst", "M mean",
                                        "P worst vs clean mean", "refused push/merge, merged", "within"], rows))
    if figures["clean_cost"]:
        lines += ["## Clean mesh: clean / clean with mean", ""]
        rows = [[agg, _fmt(c["loss"]["worst"]), _fmt(c["loss"]["mean"]), _fmt(c["shared_loss"]["worst"]),
                 _fmt(c["shared_loss"]["mean"])] for agg, c in figures["clean_cost"].items()]
        lines.append(report.markdown_table(["aggregation", "P worst", "P mean", "M worst", "M mean"], rows))
    if figures.get("noise_floor"):
        n = figures["noise_floor"]
        lines += [f"Noise floor (the clean mean mesh run twice, second / first, per honest node): P worst "
                  f"{_fmt(n['loss']['worst'])}, largest |ratio - 1| {_fmt(n['loss'].get('max_dev'))}; M worst "
                  f"{_fmt(n['shared_loss']['worst'])}, largest |ratio - 1| {_fmt(n['shared_loss'].get('max_dev'))}.",
                  ""]
    if {"median", "trimmed-mean"} <= set(opts.aggregations) and s.fanout == 2:
        lines += ["At fanout 2 a receiver aggregates 3 states (its own and 2 peers'), or 2 when one is refused: "
                  "trimmed-mean then cuts 1 of 3 (the median) or nothing of 2 (the mean of both, as the median), so "
                  "the two rules are the same computation here and their rows differ by run-to-run noise only.", ""]
    lines += ["## Raw held-out losses (honest nodes)", ""]
    rows = [[r.aggregation, r.attack or ("clean (repeat)" if r.repeat else "clean"), r.seed,
             " ".join(f"{v:.4f}" for v in r.loss.values()), " ".join(f"{v:.4f}" for v in r.shared_loss.values()),
             f"{r.seconds:.0f}"] for r in runs]
    lines.append(report.markdown_table(["aggregation", "attack", "seed", "P loss", "M loss", "wall s"], rows))
    lines += ["Attacks: " + "; ".join(f"`{a}`: {describe(a, s)}" for a in opts.attacks), ""]
    rec = figures.get("recommendation")
    if rec:
        lines += [f"Recommended default: **{rec['aggregation'] or 'none'}** ({rec['why']}).", ""]
    return "\n".join(lines)


def code_state() -> dict[str, Any]:
    """The commit measured and the node code's uncommitted changes (a defence edited mid-study shows)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted": [line[3:] for line in git("status", "--porcelain", "--", "fednode").splitlines()]}


def main(opts: Options, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run every (aggregation, attack or clean, seed) mesh, write the reports, return the summary."""
    from tools import report

    torch.set_num_threads(1)
    report.prepare_out_dir(opts.out)
    meta = report.run_metadata(opts.command, seeds=list(opts.seeds), preset=opts.setup.preset,
                               setup=opts.setup.__dict__, aggregations=list(opts.aggregations),
                               attacks=list(opts.attacks), tolerance=opts.tolerance,
                               attack_descriptions={a: describe(a, opts.setup) for a in opts.attacks},
                               code=code_state())
    runs: list[MeshRun] = []
    plan = []  # seed by seed, so a partial report holds whole seeds (see reanalyze)
    for seed in opts.seeds:
        plan += [(agg, None, seed, False) for agg in opts.aggregations]
        if opts.repeat and "mean" in opts.aggregations:
            plan.append(("mean", None, seed, True))
        plan += [(agg, attack, seed, False) for agg in opts.aggregations for attack in opts.attacks]
    with tempfile.TemporaryDirectory(prefix="fednode-poison-") as tmp:
        for i, (agg, attack, seed, repeat) in enumerate(plan, 1):
            what = f"{agg} / {attack or ('clean, repeated' if repeat else 'clean')} / seed {seed}"
            progress(f"mesh {i}/{len(plan)}: {what}")
            run = run_mesh(opts.setup, agg, attack, seed, Path(tmp) / f"m{i}", progress, repeat=repeat)
            progress(f"  done in {run.seconds:.0f}s: P {_losses(run.loss)}  M {_losses(run.shared_loss)}  "
                     f"attacker: {run.attacker_pushes} pushes, refused {run.refused_at_push} on arrival, "
                     f"{run.refused_at_merge} at merge, merged {run.attacker_merged}")
            runs.append(run)
            report.write_report(opts.out, "poison", {"metadata": meta, "complete": False,  # survives a crash
                                                     "runs": [r.to_dict() for r in runs]},
                                f"# Insider poisoning (in progress: {i}/{len(plan)} meshes)\n")
    figures = analyse(runs, opts.aggregations, opts.attacks, opts.seeds, opts.tolerance)
    text = markdown(opts, meta, figures, runs)
    paths = report.write_report(opts.out, "poison", {"metadata": meta, "complete": True, **figures,
                                                     "runs": [r.to_dict() for r in runs]}, text)
    return {"benchmark": "poison", "report": str(paths["json"]), "figures": figures, "text": text}


def reanalyze(directory: Path) -> dict[str, Any]:
    """Figures from an earlier (possibly interrupted) run's poison.json, over the seeds that have every
    (aggregation, attack) mesh; rewrites the reports in `directory`. Trains nothing."""
    import json

    from tools import report

    data = json.loads((Path(directory) / "poison.json").read_text())
    meta = data["metadata"]
    runs = [MeshRun(**r) for r in data["runs"]]
    aggregations, attacks = tuple(meta["aggregations"]), tuple(meta["attacks"])
    needed = {(a, x) for a in aggregations for x in (None, *attacks)}
    seeds = tuple(s for s in meta["seeds"]
                  if needed <= {(r.aggregation, r.attack) for r in runs if r.seed == s and not r.repeat})
    if not seeds:
        raise ValueError(f"{directory}: no seed has every (aggregation, attack) mesh yet")
    runs = [r for r in runs if r.seed in seeds]
    opts = Options(setup=Setup(**meta["setup"]), seeds=seeds, aggregations=aggregations, attacks=attacks,
                   out=Path(directory), command=meta["command"], tolerance=meta["tolerance"],
                   repeat=any(r.repeat for r in runs))
    figures = analyse(runs, aggregations, attacks, seeds, opts.tolerance)
    complete = list(seeds) == list(meta["seeds"])
    text = markdown(opts, meta, figures, runs)
    if not complete:
        text = text.replace("\n", f"\n\nPartial: seeds {list(seeds)} of {meta['seeds']} (the run was interrupted).\n",
                            1)
    paths = report.write_report(directory, "poison", {"metadata": meta, "complete": complete, "seeds_analysed":
                                                      list(seeds), **figures,
                                                      "runs": data["runs"]}, text)
    return {"benchmark": "poison", "report": str(paths["json"]), "figures": figures, "text": text}


def summary_line(result: dict[str, Any]) -> dict[str, Any]:
    """The last stdout line: per (aggregation, attack) the worst ratios and verdict, clean costs, the default."""
    figures = result["figures"]
    return {
        "benchmark": "poison",
        "report": result["report"],
        "attacked": {agg: {attack: {"p_worst": c["loss"]["worst"], "m_worst": c["shared_loss"]["worst"],
                                    "within": c["within"]} for attack, c in by.items()}
                     for agg, by in figures["attacked"].items()},
        "clean_cost": {agg: {"p_worst": c["loss"]["worst"], "m_worst": c["shared_loss"]["worst"]}
                       for agg, c in figures["clean_cost"].items()},
        "noise_floor": ({k: v["worst"] for k, v in figures["noise_floor"].items()}
                        if figures.get("noise_floor") else None),
        "recommended": (figures.get("recommendation") or {}).get("aggregation"),
    }
