import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args, env=None, timeout=600, cwd=ROOT):
    """Run ``python -m module args`` as a user would; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.pop("PRUNEFLOW_DEBUG", None)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def fault_env(fail=(), delay=None, fail_export=()):
    """Environment for a command whose trials ``fail`` (ids) or stall (``delay``: {id: seconds}), through the
    test-only hook tests/faults/sitecustomize.py: production code reads no such variables."""
    path = os.pathsep.join(p for p in (os.path.join(ROOT, "tests", "faults"), os.environ.get("PYTHONPATH")) if p)
    return dict(PYTHONPATH=path, PRUNEFLOW_TEST_FAIL=",".join(fail),
                PRUNEFLOW_TEST_DELAY=",".join(f"{k}={v}" for k, v in (delay or {}).items()),
                PRUNEFLOW_TEST_FAIL_EXPORT=",".join(fail_export))


def assert_clean_error(proc, *needles):
    """Bad input: non-zero exit, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def quickstart_study(out, dense, *args):
    """A small real sweep of jobs/quickstart.yaml (settings overridden by ``args``) from the dense checkpoint
    ``dense``, into OUT; returns the study directory."""
    seeds = () if "--seeds" in args else ("--seeds", "[0]")  # one seed: the tests need no intervals
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", out, *seeds, *args, "--dense", dense)
    assert p.returncode == 0, p.stdout + p.stderr
    return out / "quickstart"


def report_of(study, *args):
    """``python -m pruneflow.report STUDY ARGS`` that must succeed: (the process, the report directory)."""
    p = run_module("pruneflow.report", study, *args)
    assert p.returncode == 0, p.stdout + p.stderr
    return p, study / "report"


@pytest.fixture(autouse=True)
def xdist_group_holds(request):
    """Tests marked xdist_group count on sharing one worker (one local Slurm node; a module's study built once).
    With pytest 9.2, pytest-xdist's loadgroup stopped grouping without a word (pytest-dev/pytest-xdist#1386:
    its nodeid suffix no longer sticks), hence pytest<9.2 in the test extra; this says so if it comes back."""
    mark = request.node.get_closest_marker("xdist_group")
    if mark and os.environ.get("PYTEST_XDIST_WORKER") and getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@" + mark.args[0]), \
            f"--dist loadgroup did not group {request.node.nodeid} (pytest-dev/pytest-xdist#1386: pytest<9.2)"


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory):
    """A SimpleCNN trained for 3 epochs on the embedded digits (shared by many tests)."""
    from pruneflow.train import train_dense

    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    train_dense("simple_cnn", "digits", str(path), epochs=3, device="cpu", progress=False)
    return str(path)
