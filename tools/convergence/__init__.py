"""`fednode-bench convergence`: modes compared on rounds-, bytes- and wall-clock-to-target."""
