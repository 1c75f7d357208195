"""Benchmarks of the registry: the heartbeat hot path against its SQL limit, and scale runs.

`python -m bench.heartbeat` and `python -m bench.scale`; see docs/benchmarks.md.
"""
