"""The `frontier` click command (registered in fednode-bench).

Heavy imports happen inside the command, so `--help` is instant; an operator's mistake is one
line on stderr naming the fix, exit 1 (usage errors exit 2).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from tools.throughput.cli import default_cache, parse_batch_sizes

NAME = "frontier"


def parse_list(text: str | None) -> set[str] | None:
    return None if text is None else {part.strip() for part in text.split(",") if part.strip()}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--from-run", "from_run", type=click.Path(path_type=Path), required=True,
              help="The --workdir of a `fednode-bench convergence` run (it keeps every round's checkpoints).")
@click.option("--arms", default=None, help="Comma-separated arms to measure [default: every arm in the run].")
@click.option("--seeds", default=None, help="Comma-separated seeds [default: every seed in the run].")
@click.option("--nodes", default="first", show_default=True,
              help="'first' (one site per arm: the first node by name), 'all', or comma-separated node names.")
@click.option("--every", type=click.IntRange(min=1), default=5, show_default=True,
              help="Measure every k-th round (and the last).")
@click.option("--problems", type=click.IntRange(min=1), default=164, show_default=True,
              help="HumanEval problems scored for quality (bits/byte of the canonical solutions).")
@click.option("--prompts", type=click.IntRange(min=1), default=8, show_default=True,
              help="HumanEval prompts timed for speed (the same for every model).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="New tokens per timed prompt, forced (no early EOS).")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Batch sizes timed (drafting: batch 1 only).")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Cut each timed prompt to its last N tokens.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report directory (frontier.json/.md, frontier-b<N>.png) [default: bench/results/frontier].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [default: torch's choice].")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tokenizer cache [default: ~/.cache/fednode].")
def frontier(from_run: Path, arms: str | None, seeds: str | None, nodes: str, every: int, problems: int, prompts: int,
             max_new_tokens: int, batch_sizes: str, prompt_tokens: int, out_dir: Path | None, threads: int | None,
             cache: Path | None) -> None:
    """Quality versus tokens/s of P, M, the P+M ensemble and P drafted by M, round by round.

    Reads a convergence run's kept checkpoints, measures every k-th round of each arm, and
    reports the Pareto-optimal points at each batch size and whether a growing messenger moved
    the site along the frontier faster than a static one. Writes JSON, Markdown and one PNG per
    batch size; the last stdout line is one JSON object.
    """
    from tools.frontier.runs import find_runs, rounds_to_measure
    from tools.report import command_line, emit_last_line, prepare_out_dir, run_metadata, write_report

    sizes = parse_batch_sizes(batch_sizes)
    out_dir = out_dir if out_dir is not None else Path("bench") / "results" / NAME
    prepare_out_dir(out_dir)
    runs = find_runs(from_run)
    want_arms, want_seeds = parse_list(arms), parse_list(seeds)
    chosen = [r for r in runs if (want_arms is None or r.arm in want_arms)
              and (want_seeds is None or str(r.seed) in want_seeds)]
    if not chosen:
        raise click.UsageError(f"no run in {from_run} matches --arms/--seeds; it holds: "
                               + ", ".join(f"{r.arm} seed {r.seed}" for r in runs))
    plan = []
    for run in chosen:
        names = run.nodes()
        picked = names[:1] if nodes == "first" else names if nodes == "all" else sorted(parse_list(nodes) or ())
        missing = [n for n in picked if n not in names]
        if missing:
            raise click.UsageError(f"--nodes: {run.path.name} has no node {missing[0]!r} (it has {', '.join(names)})")
        for node in picked:
            found = run.checkpoints(node)
            plan += [(run, node, r, found[r]) for r in rounds_to_measure(sorted(found), every)]
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    from tools.frontier.analyze import analyze
    from tools.frontier.measure import Settings, measure_site
    from tools.frontier.models import Loader
    from tools.frontier.render import markdown, plot, summary
    from tools.humaneval.data import load_problems
    from tools.throughput.draft_length import CALIBRATION_PROMPTS
    from tools.throughput.run import encode_prompts

    start = time.monotonic()

    def say(msg: str) -> None:
        click.echo(f"[{time.monotonic() - start:7.1f}s] {msg}", err=True)

    meta = run_metadata(command_line(), seeds=sorted({r.seed for r in chosen}))
    scored = load_problems(problems)
    timed = load_problems(prompts + CALIBRATION_PROMPTS)
    loader = Loader(cache or default_cache(), seed=0)
    settings = Settings(sizes, max_new_tokens)
    result = {"from_run": str(from_run), "preset": "", "batch_sizes": list(sizes), "problems": len(scored),
              "prompts": prompts, "max_new_tokens": max_new_tokens, "every": every,
              "nodes": sorted({n for _, n, _, _ in plan}), "rows": []}
    encodings: dict[tuple[str, int], list[list[int]]] = {}
    say(f"{len(plan)} checkpoints to measure ({len(chosen)} runs)")
    try:
        for i, (run, node, rnd, path) in enumerate(plan):
            site, tok = loader.site(path)
            result["preset"] = result["preset"] or site.preset
            keep = min(prompt_tokens, site.private.config.max_position_embeddings - max_new_tokens - 1)
            if (site.preset, keep) not in encodings:  # one tokenizer per preset: encode its prompts once
                encodings[(site.preset, keep)] = encode_prompts(tok, timed, keep)
            encoded = encodings[(site.preset, keep)]
            rows = measure_site(site, tok, scored, encoded[:prompts], encoded[prompts:] or encoded[:2], settings,
                                lambda m, _a=run.arm: say(f"{_a} {m}"))
            result["rows"] += [{"arm": run.arm, "seed": run.seed, "node": node, "round": rnd, "level": site.level,
                                **row} for row in rows]
            done = time.monotonic() - start
            say(f"[{i + 1}/{len(plan)}] {run.arm} seed {run.seed} {node} round {rnd}: P {rows[0]['bpb']:.3f} bpb, "
                f"{rows[0]['tokens_per_s'].get(str(sizes[0])):.1f} tok/s at batch {sizes[0]} "
                f"(~{done / (i + 1) * (len(plan) - i - 1) / 60:.0f} min left)")
            write_report(out_dir, NAME, {"metadata": meta, "complete": False, **result}, "# Frontier (in progress)\n")
    except KeyboardInterrupt:
        click.echo(f"fednode-bench frontier: interrupted; partial rows in {out_dir}/{NAME}.json", err=True)
        sys.exit(130)
    result["analysis"] = analyze(result["rows"], sizes)
    plots = {bs: plot(result, bs, out_dir / f"{NAME}-b{bs}.png").name for bs in sizes}
    meta["seconds"] = round(time.monotonic() - start, 1)
    paths = write_report(out_dir, NAME, {"metadata": meta, "complete": True, **result}, markdown(result, meta, plots))
    say(f"wrote {paths['json']}, {paths['md']} and {len(plots)} plots")
    emit_last_line(summary(result, paths))
