"""`fednode-bench poison`: one insider in a small mesh, per aggregation rule (issue 11).

The names are here so the command line (tools.poison.cli) loads without torch; the benchmark
is tools.poison.bench.
"""

AGGREGATIONS = ("mean", "median", "trimmed-mean", "norm-clip")  # fednode.config.AGGREGATIONS
ATTACKS = ("scaled", "stealth", "noise", "sign-flip", "nan", "huge")
DEFAULT_ATTACKS = ("scaled", "stealth", "noise", "sign-flip", "nan")
TOLERANCE = 0.05  # issue 11: honest held-out loss within 5 % of a clean run
