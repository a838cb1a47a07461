"""Benchmarks and hardware checks; run as `python -m bench.run` (see README, Performance)."""
