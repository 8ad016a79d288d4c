"""Test-only fault injection, loaded where tests put tests/faults on PYTHONPATH (conftest.fault_env): every
process of a sweep (driver, Ray workers, Slurm jobs) then wraps pruneflow.trial._run.

PRUNEFLOW_TEST_FAIL="id,id"  those trials raise; PRUNEFLOW_TEST_DELAY="id=seconds" those trials stall, in a
Slurm job's first allocation only (so a requeue test knows the first allocation cannot finish);
PRUNEFLOW_TEST_FAIL_EXPORT="id,id"  those trials' ONNX exports raise (the onnxruntime runtime fails, alone).
"""

import os

if os.environ.get("PRUNEFLOW_TEST_FAIL") or os.environ.get("PRUNEFLOW_TEST_DELAY") or os.environ.get("PRUNEFLOW_TEST_FAIL_EXPORT"):
    import time

    import pruneflow.trial

    _real_run = pruneflow.trial._run

    def _run(trial, *args, **kwargs):
        if trial.id in os.environ.get("PRUNEFLOW_TEST_FAIL", "").split(","):
            raise RuntimeError(f"injected failure for {trial.id}")
        delays = dict(e.split("=", 1) for e in os.environ.get("PRUNEFLOW_TEST_DELAY", "").split(",") if "=" in e)
        if trial.id in delays and int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
            time.sleep(float(delays[trial.id]))
        _current[0] = trial.id
        return _real_run(trial, *args, **kwargs)

    pruneflow.trial._run = _run
    _current = [""]

    import pruneflow.infer.runtimes

    _real_export = pruneflow.infer.runtimes._export

    def _export(*args, **kwargs):
        if _current[0] in os.environ.get("PRUNEFLOW_TEST_FAIL_EXPORT", "").split(","):
            raise RuntimeError(f"injected export failure for {_current[0]}")
        return _real_export(*args, **kwargs)

    pruneflow.infer.runtimes._export = _export
