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
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", out, *args, "--dense", dense)
    assert p.returncode == 0, p.stdout + p.stderr
    return out / "quickstart"


def report_of(study, *args):
    """``python -m pruneflow.report STUDY ARGS`` that must succeed: (the process, the report directory)."""
    p = run_module("pruneflow.report", study, *args)
    assert p.returncode == 0, p.stdout + p.stderr
    return p, study / "report"


@pytest.fixture(scope="session")
def dense_ckpt(tmp_path_factory):
    """A SimpleCNN trained for 3 epochs on the embedded digits (shared by many tests)."""
    from pruneflow.train import train_dense

    path = tmp_path_factory.mktemp("dense") / "dense.safetensors"
    train_dense("simple_cnn", "digits", str(path), epochs=3, device="cpu", progress=False)
    return str(path)
