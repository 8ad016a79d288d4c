"""pruneflow.isolated: the sweep trains its dense model in a process of its own, which must behave like a call."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT
from pruneflow.errors import UserError
from pruneflow.isolated import run_isolated


def pid_and(value):
    return os.getpid(), value


def refuse(message):
    raise UserError(message)


def crash():
    raise ZeroDivisionError("a bug")


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def test_runs_in_another_process_and_returns_its_result():
    pid, value = run_isolated(pid_and, "test work", value={"epochs": [1, 2]})
    assert pid != os.getpid() and value == {"epochs": [1, 2]}


def test_user_error_comes_back_as_the_same_one_line_error():
    with pytest.raises(UserError, match=r"^dataset cifar10 not found under /nowhere$"):
        run_isolated(refuse, "test work", message="dataset cifar10 not found under /nowhere")


def test_a_bug_is_not_dressed_as_bad_input(capfd):
    with pytest.raises(RuntimeError, match="test work failed: ZeroDivisionError: a bug"):
        run_isolated(crash, "test work")
    assert "Traceback" in capfd.readouterr().err  # printed by the child, for whoever debugs it


def test_a_killed_child_is_named_not_waited_for():
    t0 = time.perf_counter()
    with pytest.raises(UserError, match=r"test work stopped: its process was killed by signal 9 \(SIGKILL"):
        run_isolated(die, "test work")
    assert time.perf_counter() - t0 < 60


def children(pid):
    """Processes started by ``pid`` that run a spawned function (not multiprocessing's resource tracker)."""
    return [c.pid for c in psutil.Process(pid).children() if "spawn_main" in " ".join(c.cmdline())]


def as_in_a_terminal():
    # a terminal's foreground command can be Ctrl-C'd; a background job of a non-interactive shell (a CI
    # runner's `make test &`) starts with SIGINT ignored, which Python and so the sweep and this test inherit
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, status, says", [(signal.SIGTERM, 143, "stopped by signal 15"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_stopping_the_sweep_during_dense_training_stops_the_training(tmp_path, sig, status, says):
    """The signal reaches the sweep only (as slurm/sweep.sh sends it): its training process must not live on,
    and the epochs it finished stay in the resume file."""
    proc = subprocess.Popen([sys.executable, "-m", "pruneflow.sweep", "jobs/quickstart.yaml", "--seeds", "[0]", "--out", str(tmp_path),
                             "--train_only", "--train.epochs", "200", "--noprogress"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_in_a_terminal)
    resume = tmp_path / "quickstart" / "dense-s0.safetensors.resume.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not resume.exists():
        time.sleep(0.1)
    trainers = children(proc.pid)
    assert resume.exists() and len(trainers) == 1, proc.communicate()  # one epoch done, in a child process
    os.kill(trainers[0], signal.SIGUSR2)  # Slurm's time-limit warning to every process: the parent's to act on
    time.sleep(0.5)
    assert proc.poll() is None and os.path.exists(f"/proc/{trainers[0]}")  # still training
    t0 = time.monotonic()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)  # the machine's bound; the behaviour's is asserted below
    took = time.monotonic() - t0
    assert proc.returncode == status and says in err and "Traceback" not in err, err
    assert took < 30, f"stopping took {took:.1f} s"  # a user's Ctrl-C: seconds, however busy the node
    gone = time.monotonic() + 30
    while os.path.exists(f"/proc/{trainers[0]}") and time.monotonic() < gone:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{trainers[0]}")  # no orphan still training (and still writing)
    assert resume.exists() and not (tmp_path / "quickstart" / "dense-s0.safetensors").exists()
