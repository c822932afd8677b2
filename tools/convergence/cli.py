"""`fednode-bench convergence`: every mode on the same partitions, token budget and seeds."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from tools import report
from tools.convergence import analyze, presets
from tools.convergence.presets import Arm

RAW_NAME = "convergence"


def _load_raw(directory: Path) -> dict:
    path = directory / f"{RAW_NAME}.json"
    if not directory.is_dir():
        raise click.UsageError(f"results directory {directory} does not exist: give the --out of an earlier run")
    try:
        data = json.loads(path.read_text())
        runs = data["runs"]
        if not isinstance(runs, list) or not all("arm" in r and "rounds" in r for r in runs):
            raise KeyError("runs")
    except FileNotFoundError:
        raise click.UsageError(f"{path} is missing: run the benchmark into {directory} first") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise click.UsageError(f"{path} is corrupt ({type(exc).__name__}: {exc}): rerun the benchmark") from None
    return data


def _write(out: Path, meta: dict, runs: list[dict], tolerance: float, final: bool) -> dict | None:
    """Raw runs always; the comparison once every arm has a run (partial reports survive a crash)."""
    try:
        summary = analyze.analyze(runs, tolerance) if runs else None
    except ValueError:
        summary = None
    data = {"metadata": meta, "runs": runs, "summary": summary, "complete": final}
    text = analyze.markdown(summary, meta) if summary else "# Convergence (in progress)\n"
    report.write_report(out, RAW_NAME, data, text)
    if summary and final:
        analyze.plots(runs, summary, out)
    return summary


@click.command()
@click.option("--preset", type=click.Choice(sorted(presets.PRESETS)), default="tiny-cpu", show_default=True,
              help="tiny-cpu: tiny private model + micro messenger ladder, 3 daemons, 8 rounds, 3 seeds "
                   "(~20 min on 2 cores). tiny-long: 30 rounds, both messenger families, ablations, P/M/P+M "
                   "on all 164 problems, in one process (the real node code over the transport twin). "
                   "smollm2-135m: SmolLM2-135M private model, 2 daemons, a short run.")
@click.option("--modes", default=None, help="Comma-separated arms (adaptive, static-<level>, fedavg, local), or "
                                            "'all' for static at every level [default: adaptive, static at the "
                                            "smallest and largest level, fedavg, local].")
@click.option("--seeds", default=None, help="Comma-separated seeds [default: the preset's, e.g. 0,1,2].")
@click.option("--rounds", type=click.IntRange(min=1), default=None, help="Rounds per run [default: preset].")
@click.option("--nodes", type=click.IntRange(min=2), default=None, help="Daemons per mesh [default: preset].")
@click.option("--problems", type=click.IntRange(1, 164), default=None,
              help="HumanEval problems scored per node and round [default: preset].")
@click.option("--tolerance", type=click.FloatRange(0, 0.5), default=0.02, show_default=True,
              help="Target = best seed-mean NLL any mode reached x (1 + tolerance).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Report directory [default: bench/results/convergence-<preset>].")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the meshes' files (configs, logs, journals, checkpoints) here [default: a temp dir, removed].")
@click.option("--harness", type=click.Choice(["process", "sim"]), default=None,
              help="process: every node a real daemon process over mTLS; sim: the same daemon code for every node "
                   "in one process over the transport twin [default: the preset's; tiny-long: sim].")
@click.option("--resume", is_flag=True,
              help="Keep the runs already in --out (same preset) and run only the (arm, seed) pairs missing: a long "
                   "study can be spread over several sittings, e.g. --seeds 0 now and --seeds 0,1,2 --resume later. "
                   "Earlier runs of other arms or seeds stay in the report.")
@click.option("--reanalyze", "reanalyze_dir", type=click.Path(path_type=Path), default=None,
              help="Recompute target, tables and plots from an earlier run's directory; trains nothing.")
def convergence(preset: str, modes: str | None, seeds: str | None, rounds: int | None, nodes: int | None,
                problems: int | None, tolerance: float, out: Path | None, workdir: Path | None,
                harness: str | None, resume: bool, reanalyze_dir: Path | None) -> None:
    """Run adaptive, static (each level), fedavg and local meshes of real daemons on the same data
    partitions, token budget and seeds; score every node's model on HumanEval (NLL, bits/byte)
    after every round; derive rounds-, bytes- and wall-clock-to-target with the target taken from
    the run itself. Writes convergence.json/.md and PNG plots; the last stdout line is one JSON
    object with rounds_ratio and bytes_ratio (adaptive / fedavg)."""
    if reanalyze_dir is not None:
        data = _load_raw(reanalyze_dir)
        meta = data["metadata"]
        summary = _write(out or reanalyze_dir, meta, data["runs"], tolerance, final=True)
        _finish(summary, meta, out or reanalyze_dir)
        return
    try:
        chosen = presets.resolve(preset, rounds=rounds, nodes=nodes, problems=problems, harness=harness,
                                 seeds=_ints(seeds, "--seeds") if seeds else None)
        labels = chosen.arms(every_level=modes == "all") if modes in (None, "all") else modes.split(",")
        arms = [Arm.parse(label.strip()) for label in labels]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if chosen.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.UsageError(f"preset {chosen.name} trains on a CUDA GPU (bf16) and this machine has none "
                                   f"(torch.cuda.is_available() is False): run it on a GPU host, or use "
                                   f"--preset smollm2-135m on CPU")
    out = out or Path("bench/results") / f"convergence-{chosen.name}"
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} is a file: give a directory")
    from tools.convergence.run import arm_summary, run_arm
    from tools.humaneval.data import load_problems

    scored = load_problems(chosen.problems)
    meta = report.run_metadata(report.command_line(), seeds=list(chosen.seeds), preset=chosen.name,
                               nodes=chosen.nodes, rounds=chosen.rounds, problems=chosen.problems,
                               steps_per_round=chosen.steps_per_round, batch_size=chosen.batch_size,
                               seq_len=chosen.seq_len, arms=[a.label for a in arms], private=chosen.private,
                               ladder=chosen.ladder, harness=chosen.harness,
                               public_set_overlap=_public_overlap(scored))
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="fednode-convergence-"))
    runs: list[dict] = []
    if resume and (out / f"{RAW_NAME}.json").exists():
        earlier = _load_raw(out)
        if earlier["metadata"].get("preset") != chosen.name:
            raise click.UsageError(f"--resume: {out} holds a {earlier['metadata'].get('preset')!r} run, not "
                                   f"{chosen.name!r}: give another --out")
        runs = list(earlier["runs"])  # every earlier run stays in the report, asked for this time or not
        meta["resumed_from"] = earlier["metadata"].get("date_utc")
        meta["arms"] = list(dict.fromkeys([*earlier["metadata"].get("arms", []), *meta["arms"]]))
        meta["seeds"] = sorted({*earlier["metadata"].get("seeds", []), *meta["seeds"]})
    have = {(r["arm"], r["seed"]) for r in runs}
    todo = [(seed, arm) for seed in chosen.seeds for arm in arms if (arm.label, seed) not in have]
    total, done, started = len(todo), 0, time.monotonic()
    try:
        for seed, arm in todo:
            def progress(msg: str, _done=done) -> None:
                elapsed = time.monotonic() - started
                eta = f", ~{elapsed / _done * (total - _done) / 60:.0f} min left" if _done else ""
                click.echo(f"[{_done}/{total} runs, {elapsed / 60:.1f} min{eta}] {msg}", err=True)

            result = run_arm(chosen, arm, seed, root / f"{arm.label}-seed{seed}", scored, progress)
            runs.append(arm_summary(result))
            done += 1
            _write(out, meta, runs, tolerance, final=False)
            if not workdir:
                shutil.rmtree(root / f"{arm.label}-seed{seed}", ignore_errors=True)
    except KeyboardInterrupt:
        click.echo(f"fednode-bench: interrupted after {done}/{total} runs; partial results in {out}", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - one line for the operator, the partial report stays
        click.echo(f"fednode-bench: error: convergence run failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
                   f" (partial results in {out}; keep the meshes with --workdir to read their logs)", err=True)
        sys.exit(1)
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    summary = _write(out, meta, runs, tolerance, final=True)
    _finish(summary, meta, out)


def _finish(summary: dict | None, meta: dict, out: Path) -> None:
    if summary is None:
        raise click.ClickException("no run produced a finite NLL: nothing to compare")
    click.echo(analyze.markdown(summary, meta))
    click.echo(f"report: {out}/{RAW_NAME}.json, {out}/{RAW_NAME}.md and PNG plots", err=True)
    report.emit_last_line({
        "benchmark": "convergence", "preset": meta.get("preset"), "rounds_ratio": summary["rounds_ratio"],
        "bytes_ratio": summary["bytes_ratio"], "wall_ratio": summary["wall_ratio"],
        "gain_recovered": summary.get("gain_recovered"), "capacity_gain": summary.get("capacity_gain"),
        "shared_prefix": {k: (summary.get("shared_prefix") or {}).get(k)
                          for k in ("rounds_ratio", "bytes_ratio", "gain_recovered", "capacity_gain")},
        "int8": summary.get("int8"),
        "ensemble": summary.get("ensemble"),
        "target_nll_bpb": summary["target_nll_bpb"],
        "at_adaptive_best": {k: (summary.get("at_adaptive_best") or {}).get(k)
                             for k in ("target_nll_bpb", "rounds_ratio", "bytes_ratio")},
        "rounds_to_target": {arm: a["rounds_to_target"]["mean"] for arm, a in summary["arms"].items()},
        "bytes_to_target": {arm: a["bytes_to_target"]["mean"] for arm, a in summary["arms"].items()},
    })


def _public_overlap(problems) -> dict:
    """HumanEval word-13-gram overlap of the public transfer set, over the problems scored."""
    from fednode.learning.public import public_hash, public_sources
    from tools.humaneval.overlap import overlap

    return {"public_sha256": public_hash(), **overlap(public_sources().values(), problems).to_dict()}


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} is empty")
    return values
