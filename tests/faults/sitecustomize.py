"""Test-only fault injection, loaded where tests put tests/faults on PYTHONPATH (conftest.fault_env): every
process of a sweep (driver, Ray workers, Slurm jobs) then wraps pruneflow.trial._run.

PRUNEFLOW_TEST_FAIL="id,id"  those trials raise; PRUNEFLOW_TEST_DELAY="id=seconds" those trials stall, in a
Slurm job's first allocation only (so a requeue test knows the first allocation cannot finish).
"""

import os

if os.environ.get("PRUNEFLOW_TEST_FAIL") or os.environ.get("PRUNEFLOW_TEST_DELAY"):
    import time

    import pruneflow.trial

    _real_run = pruneflow.trial._run

    def _run(trial, *args, **kwargs):
        if trial.id in os.environ.get("PRUNEFLOW_TEST_FAIL", "").split(","):
            raise RuntimeError(f"injected failure for {trial.id}")
        delays = dict(e.split("=", 1) for e in os.environ.get("PRUNEFLOW_TEST_DELAY", "").split(",") if "=" in e)
        if trial.id in delays and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
            time.sleep(float(delays[trial.id]))
        return _real_run(trial, *args, **kwargs)

    pruneflow.trial._run = _run
