"""`fednode-bench frontier`: quality versus speed of every model a site could serve, round by round.

From a convergence run's kept checkpoints (`fednode-bench convergence --workdir DIR`): P, the
messenger at its level, the P+M ensemble and P drafted by the messenger (distilled family) or by
its own shared prefix (shared-prefix family), scored on HumanEval (bits/byte) and timed (tokens/s
at batch 1 and 8 on the same prompts). Which points are Pareto-optimal, and whether a growing
messenger moved the site along the frontier faster than a static one (dominated area per round).
"""
