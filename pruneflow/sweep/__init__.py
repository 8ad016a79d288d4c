"""A study's sweep on one node: ``driver`` (resume checks, dense model, the shard's trials, summary),
``packing`` (how many trials at a time, and the kept measurements), ``pool`` (Ray tasks: submit, wait, retry,
drain on SIGTERM), ``summary`` (provenance and the terminal table). ``python -m pruneflow.sweep JOB``."""

from .driver import cli, main, run_sweep

__all__ = ["cli", "main", "run_sweep"]
