"""`fednode-bench poison`: the command line (the benchmark itself is tools.poison.bench)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tools.poison import AGGREGATIONS, ATTACKS, DEFAULT_ATTACKS, TOLERANCE


def _names(value: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(x.strip() for x in value.split(",") if x.strip()))
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise click.UsageError(f"{option} {value!r}: use a comma-separated list of {', '.join(allowed)}")
    return names


def _seeds(value: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in value.split(",") if x.strip()))
    except ValueError:
        raise click.UsageError(f"--seeds must be comma-separated integers, got {value!r}") from None
    if not seeds:
        raise click.UsageError("--seeds needs at least one seed")
    return seeds


@click.command()
@click.option("--rounds", type=click.IntRange(min=1), default=10, show_default=True,
              help="Rounds per mesh; losses are scored after the last one.")
@click.option("--nodes", type=click.IntRange(min=3), default=4, show_default=True,
              help="Nodes per mesh; in attacked runs the last one is the attacker.")
@click.option("--seeds", default="0,1", show_default=True, help="Comma-separated model seeds (same partitions).")
@click.option("--aggregations", default=",".join(AGGREGATIONS), show_default=True,
              help="Comma-separated [learning] aggregation rules to compare (include mean for the clean cost).")
@click.option("--attacks", default=",".join(DEFAULT_ATTACKS), show_default=True,
              help=f"Comma-separated attacks, of: {', '.join(ATTACKS)}.")
@click.option("--preset", type=click.Choice(["micro", "tiny"]), default="micro", show_default=True,
              help="Private model preset (its distilled messenger ladder travels, at level 0).")
@click.option("--steps", "steps_per_round", type=click.IntRange(min=1), default=4, show_default=True,
              help="Training steps per round.")
@click.option("--stealth-scale", type=click.FloatRange(max=0), default=-3.0, show_default=True,
              help="The stealth attack's multiple of the honest delta (closer to -4: nearer the merge screen's bound).")
@click.option("--fanout", type=click.IntRange(min=1), default=2, show_default=True,
              help="[mesh] fanout: peers each node pushes to per round (a receiver merges about fanout + 1 states).")
@click.option("--tolerance", type=click.FloatRange(0, 1), default=TOLERANCE, show_default=True,
              help="Within: worst honest node's attacked / clean loss <= 1 + tolerance.")
@click.option("--repeat/--no-repeat", default=True, show_default=True,
              help="Run the clean mean mesh a second time per seed: the run-to-run noise floor.")
@click.option("--reanalyze", "reanalyze_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Recompute the figures from an earlier run's poison.json (an interrupted one: its whole seeds); "
                   "trains nothing.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench/results/poison"), show_default=True,
              help="Report directory (poison.json, poison.md).")
def poison(rounds: int, nodes: int, seeds: str, aggregations: str, attacks: str, preset: str,
           steps_per_round: int, stealth_scale: float, fanout: int, tolerance: float, repeat: bool,
           reanalyze_dir: Path | None,
           out: Path) -> None:
    """One insider in a small mesh of full nodes (the real node code over the transport twin): for
    each aggregation a clean mesh and the same mesh with the last node pushing a poisoned messenger
    every round. Reports each honest node's held-out loss attacked / clean (worst, mean, within the
    tolerance) and each robust aggregation's clean cost against mean: the default's evidence."""
    from tools import report
    from tools.poison import bench

    if reanalyze_dir is not None:
        try:
            result = bench.reanalyze(reanalyze_dir)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise click.UsageError(f"cannot reanalyze {reanalyze_dir}: {type(exc).__name__}: {exc}") from None
        click.echo(result["text"])
        report.emit_last_line(bench.summary_line(result))
        return
    if out.exists() and not out.is_dir():
        raise click.UsageError(f"--out {out} is a file: give a directory")
    setup = bench.Setup(nodes=nodes, rounds=rounds, preset=preset, steps_per_round=steps_per_round,
                        stealth_scale=stealth_scale, fanout=fanout)
    opts = bench.Options(setup=setup,
                         seeds=_seeds(seeds), aggregations=_names(aggregations, AGGREGATIONS, "--aggregations"),
                         attacks=_names(attacks, ATTACKS, "--attacks"), out=out, command=report.command_line(),
                         tolerance=tolerance, repeat=repeat)
    try:
        result = bench.main(opts, lambda m: click.echo(m, err=True))
    except KeyboardInterrupt:
        click.echo("fednode-bench: interrupted", err=True)
        sys.exit(130)
    except report.ReportError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the operator
        click.echo(f"fednode-bench: error: poison benchmark failed: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    click.echo(result["text"])
    report.emit_last_line(bench.summary_line(result))
