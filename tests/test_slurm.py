"""pruneflow on a real Slurm (slurm/local/start.sh): the submitit pipeline, sbatch scripts, requeue on timeout."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import ROOT, assert_clean_error, fault_env, run_module
from pruneflow.results import read_study, read_trials
from pruneflow.spec import grid, load_spec

# one local Slurm node: these tests run one after another on one xdist worker (make test uses -n 2)
pytestmark = [pytest.mark.slurm, pytest.mark.xdist_group("slurm")]

SMALL = ["--seeds", "[0]", "--prune.sparsities", "[0.5]", "--finetune.epochs", "1", "--latency.trials", "3", "--train.epochs", "1"]


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    up = shutil.which("sinfo") and subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    if not up:
        if os.environ.get("PRUNEFLOW_REQUIRE_SLURM"):
            pytest.fail("Slurm is not running (bash slurm/local/start.sh)")
        pytest.skip("no Slurm here: run bash slurm/local/start.sh")


def sacct_states(job_ids):
    """{job id: state} from accounting, every requeue included (-D)."""
    p = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,State", "-j", ",".join(job_ids)],
                       capture_output=True, text=True)
    rows = [ln.split("|") for ln in p.stdout.split("\n") if ln.strip()]
    return rows


def wait_for(job_ids, timeout=600):
    """Wait until none of the jobs is queued or running; release requeue holds (BeginTime) at once."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = subprocess.run(["squeue", "-h", "-o", "%i|%T|%r", "-j", ",".join(job_ids)], capture_output=True, text=True)
        rows = [ln.split("|") for ln in q.stdout.split("\n") if ln.strip()]
        if not rows:
            time.sleep(2)  # sacct lags squeue by a second or two
            return
        for jid, state, reason in rows:
            if state == "PENDING" and reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], capture_output=True)
        time.sleep(2)
    subprocess.run(["scancel", *job_ids])
    pytest.fail(f"jobs {job_ids} did not finish in {timeout} s")


def submit(tmp_path, *args, env=None):
    p = run_module("pruneflow.submit", "jobs/quickstart.yaml", "--partition", "debug", "--cpus-per-task", 1,
                   "--out", tmp_path, *args, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("submitted study")][0]
    words = line.replace("->", " ").split()
    ids = {"train": words[4], "sweep": words[7], "report": words[11]}
    return ids, p.stdout


def test_submit_pipeline_completes(tmp_path):
    ids, out = submit(tmp_path, "--nodes", 2, *SMALL)
    assert "logs:" in out and "squeue" in out
    wait_for(list(ids.values()))
    states = dict(sacct_states(list(ids.values())))
    assert states[ids["train"]] == "COMPLETED" and states[ids["report"]] == "COMPLETED", states
    assert states[f"{ids['sweep']}_0"] == states[f"{ids['sweep']}_1"] == "COMPLETED", states
    study = tmp_path / "quickstart"
    assert (study / "shard-0-of-2.h5").exists() and (study / "shard-1-of-2.h5").exists()
    # the same trials as a local sweep of the same job file and flags
    spec, _ = load_spec("jobs/quickstart.yaml", {k.lstrip("-"): v for k, v in zip(SMALL[::2], SMALL[1::2])})
    expected = sorted(t.id for t in grid(spec))
    assert len(expected) == 5
    assert sorted(r["id"] for r in read_study(study) if r["status"] == "done") == expected
    assert (study / "report" / "summary.md").exists()


def test_sbatch_sweep_script_two_shards_and_gpu_request(tmp_path):
    """slurm/sweep.sh as a 2-task array; it asks for a GPU per node (the fake ones): Slurm schedules it, the
    sweep sees the allocation and says it falls back to the CPU."""
    env = dict(os.environ, PRUNEFLOW_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               PRUNEFLOW_OUT=str(tmp_path), PRUNEFLOW_ARGS=" ".join(SMALL))
    p = subprocess.run(["sbatch", "--wait", "--parsable", "--cpus-per-task=1", f"--output={tmp_path}/log-%A_%a.out",
                        "slurm/sweep.sh", "jobs/quickstart.yaml"], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    study = tmp_path / "quickstart"
    a, b = read_trials(study / "shard-0-of-2.h5"), read_trials(study / "shard-1-of-2.h5")
    assert all(r["status"] == "done" for r in a + b) and len(a) + len(b) == 5
    assert not {r["id"] for r in a} & {r["id"] for r in b}
    logs = "".join(open(tmp_path / f) .read() for f in os.listdir(tmp_path) if f.startswith("log-"))
    assert "Slurm allocated GPU(s) 0 but CUDA cannot use them here; running on CPU" in logs
    assert all(r["device"] == "cpu" for r in a + b)


def test_forced_timeout_requeues_and_resumes(tmp_path):
    """A 2-minute limit on a study that needs longer: the shard is signalled, requeued, resumed, and every
    trial ends up exactly once."""
    # The last trial stalls in the first allocation (fault injection), so that one cannot finish the study and a
    # requeued one can. Slurm's timer is coarse: with a 1-minute limit an allocation was signalled 15-30 s in,
    # ~20 s after its start, too short on a slow 2-core machine for one trial's worker to start and finish
    ids, _ = submit(tmp_path, "--nodes", 1, "--time", 2, "--signal-delay-s", 15, "--seeds", "[0]", "--finetune.epochs", 1,
                    "--train.epochs", 1, "--latency.trials", 3, "--prune.methods", "[l1]",
                    "--prune.sparsities", "[0.3,0.7]", env=fault_env(delay={"l1-0.70-s0": 300}))
    wait_for(list(ids.values()), timeout=900)
    rows = sacct_states([ids["sweep"]])
    assert any(state == "REQUEUED" for _, state in rows), rows
    assert rows[-1][1] == "COMPLETED", rows
    records = read_trials(tmp_path / "quickstart" / "shard-0-of-1.h5")
    assert len(records) == len({r["id"] for r in records}) == 4
    assert all(r["status"] == "done" for r in records)


def test_dry_run_shows_what_would_be_asked(tmp_path):
    p = run_module("pruneflow.submit", "jobs/quickstart.yaml", "--partition", "a100", "--nodes", 3,
                   "--gpus-per-node", 4, "--cpus-per-task", 2, "--mem", "8G", "--time", "02:00:00", "--dry-run",
                   "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    for s in ("--partition=a100", "--array=0-2%3", "--dependency='afterok:", "--dependency='afterany:",
              "--cpus-per-task=2", "--mem=8G", "--time=120", "--signal=USR2@90"):
        assert s in p.stdout, s
    jobs = dict(re.findall(r"# ---- (\w+) job of study .*?\n(.*?)(?=# ---- |\Z)", p.stdout, re.S))
    assert set(jobs) == {"train", "sweep", "report"}
    assert "--gpus-per-node=4" in jobs["sweep"]  # each shard packs trials onto its 4 GPUs
    assert "--gpus-per-node=1" in jobs["train"]  # one model trains on one GPU: 3 would sit idle
    assert "--gpus-per-node" not in jobs["report"]
    assert not (tmp_path / "quickstart" / "slurm").exists()  # nothing was submitted
    assert f"{sys.executable} -u -m submitit.core._submit" in jobs["sweep"]  # the interpreter a submission runs
    # the report draws figures: a shard's node, memory and time would only keep it queued
    p = run_module("pruneflow.submit", "jobs/quickstart.yaml", "--partition", "a100", "--gpus-per-node", 4,
                   "--cpus-per-task", 32, "--mem", "1T", "--time", "1-00:00:00", "--report-partition", "debug",
                   "--dry-run", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    jobs = dict(re.findall(r"# ---- (\w+) job of study .*?\n(.*?)(?=# ---- |\Z)", p.stdout, re.S))
    for s in ("--partition=a100", "--cpus-per-task=32", "--mem=1T", "--time=1440"):
        assert s in jobs["sweep"] and s in jobs["train"], s
    for s in ("--partition=debug", "--cpus-per-task=2", "--mem=8192M", "--time=30", "--signal=USR2@90"):
        assert s in jobs["report"], s


def test_dry_run_without_a_controller_still_prints(tmp_path):
    # the same cluster's config with a port no controller listens on: sinfo fails, as when slurmctld is down
    conf = tmp_path / "slurm.conf"
    with open(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")) as f:
        conf.write_text("".join("SlurmctldPort=6899\n" if ln.startswith("SlurmctldPort=") else ln for ln in f))
    args = ["jobs/quickstart.yaml", "--partition", "a100", "--out", tmp_path]
    p = run_module("pruneflow.submit", *args, "--dry-run", env=dict(SLURM_CONF=str(conf)))
    assert p.returncode == 0, p.stderr
    assert "partition 'a100' not checked" in p.stderr and "--partition=a100" in p.stdout
    # a real submission still refuses: the partition cannot be checked
    assert_clean_error(run_module("pruneflow.submit", *args, env=dict(SLURM_CONF=str(conf))), "sinfo failed")


@pytest.mark.parametrize("args, needles", [
    (["--partition", "nosuch"], ["unknown partition 'nosuch'", "debug"]),
    (["--partition", "debug", "--report-partition", "nosuch"], ["unknown partition 'nosuch' (--report-partition)"]),
    (["--nodes", 0], ["--nodes"]),
    (["--time", "1:xx"], ["not a Slurm time"]),
    (["--prune.sparsites", "[0.5]"], ["did you mean 'sparsities'"]),
    (["--prune.sparsities", "[1.5]"], ["outside (0, 1)"]),
    (["--mem", "lots", "--dry-run"], ["--mem must be a size such as 64G"]),
    (["--signal-delay-s", -5, "--dry-run"], ["--signal-delay-s must be a whole number >= 1, got -5"]),
    (["--time", 1, "--dry-run"], ["--signal-delay-s 90 must be shorter than the time limit (1 min)"]),
    (["--gpus-per-node", -1, "--dry-run"], ["--gpus-per-node must be a whole number >= 0, got -1"]),
])
def test_submit_bad_input(tmp_path, args, needles):
    assert_clean_error(run_module("pruneflow.submit", "jobs/quickstart.yaml", "--out", tmp_path, *args), *needles)


def test_slurms_environment_gives_the_sweep_its_gpus_and_memory(tmp_path):
    """Slurm's own environment decides: a job without GPUs hides them (device auto), one with a GPU keeps its own;
    a job's --mem is the memory its trials are packed into (resources.memory_per_trial); its CPUs, asked with
    --cpus-per-task or not (1 then: this node does not bind CPUs, so every core is in the job's affinity), are
    the trials' cores."""
    probe = (f"import os, sys; sys.path.insert(0, {str(ROOT)!r}); "
             "from pruneflow.cluster import job_cpus, job_memory, keep_to_slurm_gpus; "
             f"hid = keep_to_slurm_gpus('auto', gpu_files={str(tmp_path / 'nvidia[0-9]*')!r}); "
             "print(hid, repr(os.environ.get('CUDA_VISIBLE_DEVICES')), job_memory()[0], job_cpus())")
    ids = {}
    for name, extra in (("none", ["-p", "debug", "--mem=300M"]),
                        ("one", ["-p", "a100", "--gres=gpu:1", "--mem=200M", "--cpus-per-task=2"])):
        p = subprocess.run(["sbatch", "--parsable", *extra, "-o", str(tmp_path / f"{name}.out"),
                            "--wrap", f"{sys.executable} -c {shlex.quote(probe)}"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        ids[name] = p.stdout.strip().split(";")[0]
    wait_for(list(ids.values()), timeout=120)
    assert (tmp_path / "none.out").read_text().split() == ["True", "''", str(300 * 2**20), "1"]
    assert (tmp_path / "one.out").read_text().split() == ["False", "'0'", str(200 * 2**20), "2"]
