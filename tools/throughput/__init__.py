"""`fednode-bench throughput`: generation and training speed of a site's models.

Measures, on HumanEval prompts, greedy generation tokens/s of the private model, of the
messenger at each ladder level, and of the private model drafted by the messenger (transformers
assisted generation), checks that drafting leaves the private model's greedy output unchanged,
and times the daemon's own training step. Modules, one job each:

- `metrics`: pure decisions (speedup, acceptance, identity, batching);
- `presets`: which private model and messenger ladder a preset means (as the daemon builds them);
- `from_run`: trained models from a run's checkpoints;
- `draft`: distilling the messenger into a drafter when no trained run is given;
- `generation`: timed greedy / assisted generation;
- `training`: timed trainer steps;
- `render`: Markdown, plot and the last-line summary;
- `run`: the benchmark end to end; `cli`: the click command.
"""
