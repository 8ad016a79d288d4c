"""Packing trials onto devices (fixed K and auto), utilisation sampling, and the packing benchmark."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_clean_error, run_module
from pruneflow.results import read_trials, read_utilisation
from pruneflow.spec import ResourcesSpec, StudySpec, load_spec
from pruneflow.sweep.packing import AUTO_MEMORY_SHARE, choose_trials_per_gpu, plan_packing, probe_key, remembered

GiB = 2**30


def spec_with(**resources):
    return StudySpec(resources=ResourcesSpec(**resources))


def test_auto_k_is_bounded_by_memory_cores_and_at_least_one():
    assert choose_trials_per_gpu(10 * GiB, 80 * GiB, 16) == int(80 * AUTO_MEMORY_SHARE // 10)  # memory: 6
    assert choose_trials_per_gpu(1 * GiB, 80 * GiB, 4) == 4  # cores per GPU
    assert choose_trials_per_gpu(100 * GiB, 80 * GiB, 16) == 1  # too big still runs, alone
    assert choose_trials_per_gpu(1, 80 * GiB, 1000) == 32  # a hard ceiling


def test_plan_on_gpu_uses_the_probe_for_auto_and_fixed_k_otherwise():
    probe = lambda device: dict(footprint_bytes=3 * GiB, total_bytes=24 * GiB)  # noqa: E731
    auto = plan_packing(spec_with(trials_per_gpu="auto"), cpus=16, gpus=2, probe=probe)
    k = int(24 * AUTO_MEMORY_SHARE // 3)
    assert auto.per_device == k and auto.slots == 2 * k and auto.options["num_gpus"] == pytest.approx(1 / k)
    assert "3.00 GiB" in auto.note and auto.device == "cuda"
    fixed = plan_packing(spec_with(trials_per_gpu=8), cpus=16, gpus=1, probe=None)
    assert fixed.options == dict(num_gpus=1 / 8, num_cpus=0) and fixed.slots == 8

    def broken(device):
        raise RuntimeError("CUDA out of memory")

    fallback = plan_packing(spec_with(trials_per_gpu="auto"), cpus=16, gpus=1, probe=broken)
    assert fallback.per_device == 1 and "probe failed" in fallback.note


@pytest.mark.parametrize("cpus,threads,slots,used", [(2, 1, 2, 1), (2, 4, 1, 2), (8, 3, 2, 3), (1, 2, 1, 1)])
def test_plan_on_cpu_never_exceeds_the_cores(cpus, threads, slots, used):
    plan = plan_packing(spec_with(trials_per_gpu="auto", threads_per_trial=threads), cpus=cpus, gpus=0)
    assert plan.slots == slots and plan.threads == used and plan.device == "cpu"
    assert plan.slots * plan.options["num_cpus"] <= cpus  # what Ray is asked for at once


@pytest.mark.parametrize("cpus,n_trials,slots,threads", [(2, 29, 2, 1), (2, 1, 1, 2), (32, 8, 8, 4), (8, 3, 4, 2),
                                                       (16, 16, 16, 1), (4, 0, 4, 1)])
def test_auto_threads_share_the_cores_among_the_trials_to_run(cpus, n_trials, slots, threads):
    plan = plan_packing(spec_with(threads_per_trial="auto"), cpus=cpus, gpus=0, n_trials=n_trials)
    assert (plan.slots, plan.threads, plan.options["num_cpus"]) == (slots, threads, threads)
    assert plan.slots * threads <= cpus and min(slots, max(n_trials, 1)) * threads <= cpus
    assert StudySpec().resources.threads_per_trial == 1  # the default: auto only where asked (small models lose)
    gpu = plan_packing(spec_with(threads_per_trial="auto", trials_per_gpu=4), cpus=cpus, gpus=1, n_trials=n_trials)
    assert gpu.threads == 1  # GPU trials: CPU work is light, one thread each


def test_plan_on_apple_silicon_uses_mps_and_caps_trials():
    auto = plan_packing(spec_with(device="auto", trials_per_gpu="auto"), cpus=10, gpus=0, mps=True)
    assert auto.device == "mps" and auto.slots == 2 and auto.options == dict(num_gpus=0, num_cpus=5)
    assert plan_packing(spec_with(device="mps", trials_per_gpu=8), cpus=4, gpus=0).slots == 4  # cores cap
    assert plan_packing(spec_with(device="auto"), cpus=4, gpus=0, mps=False).device == "cpu"
    assert plan_packing(spec_with(device="cpu"), cpus=4, gpus=0, mps=True).device == "cpu"  # asked for


def test_ray_runs_no_more_mps_trials_at_once_than_the_plan_allows():
    # Ray knows nothing of the MPS device: the cap must come from the CPUs each trial asks for. Real Ray, 4
    # logical CPUs, K = 2: never more than 2 tasks running (asking for 1 CPU each, 4 ran).
    from pruneflow.sweep.pool import local_ray, remote_for

    def occupy():
        import time

        t0 = time.time()
        time.sleep(1.5)  # long enough for Ray to start more workers, were it allowed to
        return t0, time.time()

    plan = plan_packing(spec_with(device="mps", trials_per_gpu=2), cpus=4, gpus=0)
    assert plan.slots == 2
    with local_ray(4, 0):
        import ray

        spans = ray.get([remote_for(occupy, plan).remote() for _ in range(6)])
    most = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert 1 <= most <= 2, spans


def test_job_file_trials_per_gpu(tmp_path):
    job = tmp_path / "j.yaml"
    job.write_text("resources:\n  trials_per_gpu: auto\n")
    assert load_spec(job)[0].resources.trials_per_gpu == "auto"
    job.write_text("resources:\n  trials_per_gpu: 4\n")
    assert load_spec(job)[0].resources.trials_per_gpu == 4
    for key in ("trials_per_gpu", "threads_per_trial"):
        for bad, needle in (("many", "'auto'"), ("0", ">= 1")):
            p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--seeds", "[0]", "--out", tmp_path, f"--resources.{key}", bad)
            assert_clean_error(p, key, needle)


def test_sweep_with_one_slurm_cpu_runs_one_thread_and_samples_utilisation(tmp_path, dense_ckpt):
    """Slurm gave one CPU, the job asks 3 threads per trial and auto packing: one trial at a time, one thread
    (Ray would wait forever for a 3-CPU slot on a 1-CPU instance), and the run's utilisation is stored."""
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--seeds", "[0]", "--out", tmp_path, "--dense", dense_ckpt,
                   "--prune.methods", "[l1@depgraph]", "--prune.sparsities", "[0.5]", "--finetune.epochs", "1",
                   "--latency.trials", "3", "--resources.threads_per_trial", "3", "--resources.trials_per_gpu", "auto",
                   "--resources.sample_interval_s", "0.2", "--latency.threads", "2", "--noprogress",
                   env={"SLURM_CPUS_PER_TASK": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "1 at a time on 0 GPU(s) / 1 CPU(s), 1 thread(s) each" in p.stdout
    path = tmp_path / "quickstart" / "shard-0-of-1.h5"
    records = read_trials(path)
    assert len(records) == 3 and all(r["trials_per_device"] == 1 for r in records)
    assert all(r["latency_settings"]["threads"] == 2 for r in records)  # timed as the job says, not as trained
    spans = sorted((r["started_at"], r["ended_at"]) for r in records)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))  # one at a time: no overlap
    (run,) = read_utilisation(path)
    s = run["series"]
    assert len(s["time"]) >= 3 and len(s["cpu_percent"]) == len(s["time"]) == len(s["memory_used_bytes"])
    assert run["attrs"]["interval_s"] == pytest.approx(0.2) and run["attrs"]["slots"] == 1
    assert s["time"][0] <= spans[0][0] and s["time"][-1] >= spans[-1][1] - 1.0  # the samples cover the trials
    assert s["memory_used_bytes"].min() > 0 and 0 <= s["cpu_percent"].max() <= 100


def test_synthetic_datasets_have_the_real_shapes_and_sizes():
    from pruneflow.data import load_split

    x, y = load_split("synthetic-cifar10", "test")
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8 and y.max() < 10
    x2, _ = load_split("synthetic-cifar10", "test")
    assert torch.equal(x, x2)  # seeded: every trial sees the same images
    # MNIST's 60,000 training images: 55,000 to train on, 5,000 held out as val
    assert load_split("synthetic-mnist", "train")[0].shape == (55000, 1, 28, 28)
    assert load_split("synthetic-mnist", "val")[0].shape == (5000, 1, 28, 28)


@pytest.mark.slow
def test_packing_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/packing.py", "--quick", "--ks", "1,auto"], capture_output=True,
                       text=True, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.split() and ln.split()[0] in ("1", "2", "auto")}
    assert set(rows) == {"1", "auto"}, p.stdout
    assert rows["1"][1] == "1" and float(rows["1"][5]) == pytest.approx(1.0, abs=0.05)
    cores = len(__import__("os").sched_getaffinity(0))
    assert int(rows["auto"][1]) == cores  # CPU auto: one trial per core, one thread each
    stages = {ln.split()[0]: ln.split()[-7:] for ln in p.stdout.splitlines() if ln.split() and ln.split()[0].startswith("K=")}
    assert len(stages) == 2 and all(float(v) >= 0 for v in stages["K=1"][:-1]), p.stdout  # 'other' may round < 0


def packing_benchmark():
    import importlib.util

    benchmarks = os.path.join(ROOT, "benchmarks")
    spec = importlib.util.spec_from_file_location("packing_benchmark", os.path.join(benchmarks, "packing.py"))
    sys.path.insert(0, benchmarks)  # its `from _common import ...`
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(benchmarks)
    return module


def test_busy_seconds_integrates_utilisation_inside_the_span_only():
    busy_seconds = packing_benchmark().busy_seconds
    # samples every 0.5 s: each is the utilisation over the half second before it
    series = dict(time=torch.arange(0, 5.01, 0.5).double().numpy(),
                  gpu0_util_percent=torch.tensor([0, 100, 100, 50, 50, 0, 0, 100, 100, 100, 100]).double().numpy())
    assert busy_seconds(series, 0.0, 5.0) == pytest.approx(0.5 * (1 + 1 + 0.5 + 0.5 + 1 + 1 + 1 + 1))
    assert busy_seconds(series, 0.25, 1.0) == pytest.approx(0.25 + 0.5)  # partial first interval
    assert busy_seconds(series, 2.0, 3.0) == 0.0  # the samples at 2.5 and 3.0 read idle
    assert busy_seconds(dict(time=series["time"], cpu_percent=series["gpu0_util_percent"]), 0, 5) is None


def test_busy_seconds_of_a_real_h200_sweep_is_additive_and_below_its_span():
    # the utilisation an H200 recorded while 8 ResNet-18 trials ran one at a time (docs/data/README.md)
    bench = packing_benchmark()
    path = os.path.join(ROOT, "docs", "data", "h200-packing-k1", "shard-0-of-1.h5")
    records = read_trials(path)
    series = read_utilisation(path)[-1]["series"]
    start, end = min(r["started_at"] for r in records), max(r["ended_at"] for r in records)
    whole = bench.busy_seconds(series, start, end)
    middle = (start + end) / 2
    assert 0 < whole < end - start
    assert bench.busy_seconds(series, start, middle) + bench.busy_seconds(series, middle, end) == pytest.approx(whole)
    means = bench.stage_means(records)
    assert sum(means.values()) == pytest.approx(sum(r["wall_s"] for r in records) / len(records))
    assert means["finetune"] > means["save"]


def test_packing_benchmark_analyses_kept_results_without_a_sweep():
    kept = os.path.join("docs", "data", "h200-packing-k8")
    p = subprocess.run([sys.executable, "benchmarks/packing.py", "--analyse", kept], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    row = next(ln.split() for ln in p.stdout.splitlines() if ln.startswith(kept))
    path = os.path.join(ROOT, kept, "shard-0-of-1.h5")
    records = read_trials(path)
    start, end = min(r["started_at"] for r in records), max(r["ended_at"] for r in records)
    busy = packing_benchmark().busy_seconds(read_utilisation(path)[-1]["series"], start, end)
    assert row[1] == "8" and float(row[2]) == pytest.approx(end - start, abs=0.05)
    assert float(row[4]) == pytest.approx(busy, abs=0.05)
    missing = subprocess.run([sys.executable, "benchmarks/packing.py", "--analyse", "no-such-folder"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode != 0 and "no-such-folder" in missing.stderr and "Traceback" not in missing.stderr


def test_the_probe_is_measured_once_per_study_and_settings(tmp_path):
    # a requeued or later shard of the same study on the same kind of GPU packs without probing again
    calls = []

    def probe(device):
        calls.append(device)
        return dict(footprint_bytes=3 * GiB, total_bytes=24 * GiB, max_allocated_bytes=GiB)

    path = str(tmp_path / "packing-probe.json")
    first = remembered(probe, path, "key-a")("cuda")
    assert calls == ["cuda"] and first["footprint_bytes"] == 3 * GiB and first["probe_s"] >= 0
    again = remembered(probe, path, "key-a")("cuda")
    assert calls == ["cuda"] and again == dict(footprint_bytes=3 * GiB, total_bytes=24 * GiB, reused_from=path)
    plan = plan_packing(spec_with(trials_per_gpu="auto"), cpus=16, gpus=1, probe=remembered(probe, path, "key-a"))
    assert plan.per_device == int(24 * AUTO_MEMORY_SHARE // 3) and "earlier sweep of this study" in plan.note
    remembered(probe, path, "key-b")("cuda")  # other settings: measured, and both kept
    assert len(calls) == 2 and set(json.load(open(path))) == {"key-a", "key-b"}
    (tmp_path / "packing-probe.json").write_text('{"key-a": {"footprint_bytes": "garbled"')  # a torn copy
    assert "reused_from" not in remembered(probe, path, "key-a")("cuda") and len(calls) == 3
    assert json.load(open(path))["key-a"]["footprint_bytes"] == 3 * GiB  # written anew


def test_the_probe_is_measured_again_when_what_it_depends_on_changes(tmp_path):
    dense = tmp_path / "dense.safetensors"
    dense.write_bytes(b"x" * 1000)
    config = dict(model=dict(arch="resnet18"), data=dict(dataset="cifar10"), finetune=dict(epochs=1, batch_size=64),
                  performance=dict(compile="cudagraphs"), resources=dict(trials_per_gpu="auto"))
    gpu = ["NVIDIA H200", 150_000_000_000]
    key = probe_key(config, str(dense), gpu)
    assert probe_key(dict(config, resources=dict(trials_per_gpu=8)), str(dense), gpu) == key  # not a footprint input
    assert probe_key(dict(config, performance=dict(compile="reduce-overhead")), str(dense), gpu) != key
    assert probe_key(dict(config, finetune=dict(epochs=1, batch_size=512)), str(dense), gpu) != key
    assert probe_key(config, str(dense), ["NVIDIA A100-SXM4-40GB", 42_000_000_000]) != key
    dense.write_bytes(b"x" * 900)  # another dense model (other widths)
    assert probe_key(config, str(dense), gpu) != key


def test_each_trial_worker_keeps_to_the_gpu_ray_gave_it_on_multi_gpu_nodes():
    # Real Ray with two logical GPUs (no CUDA needed: Ray only sets CUDA_VISIBLE_DEVICES per task). A process
    # reads that variable once, when CUDA starts; a worker reused for a task on the other GPU would run it on
    # its first GPU. K=2 on 2 GPUs: every worker process must only ever have been given one GPU.
    from pruneflow.sweep.pool import local_ray, remote_for

    def which_gpu():
        import time

        time.sleep(0.2)  # overlap the tasks, so that several workers exist and could be swapped around
        return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")

    plan = plan_packing(spec_with(trials_per_gpu=2), cpus=2, gpus=2)
    assert plan.max_calls == 1 and plan_packing(spec_with(trials_per_gpu=2), cpus=2, gpus=1).max_calls == 0
    with local_ray(2, 2):
        import ray

        seen = {}
        for pid, gpu in ray.get([remote_for(which_gpu, plan).remote() for _ in range(12)]):
            seen.setdefault(pid, set()).add(gpu)
    assert {g for gpus in seen.values() for g in gpus} == {"0", "1"}  # both GPUs were used
    assert all(len(gpus) == 1 for gpus in seen.values()), seen


def test_cpus_are_slurms_number_but_never_more_than_this_process_may_run_on(monkeypatch):
    from pruneflow.cluster import job_cpus
    from pruneflow.sweep.driver import slot_counts

    cores = len(os.sched_getaffinity(0))
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert slot_counts("cpu") == (1, 0)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cores + 6))  # inherited from a larger allocation
    assert slot_counts("cpu") == (cores, 0)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    assert slot_counts("cpu") == (cores, 0)
    # a job that did not ask --cpus-per-task (submit without it, a bare sbatch): Slurm's CPUs on this node count,
    # where a node that does not bind CPUs lets the affinity be every core (a walkthrough's 2 shards of 1 CPU
    # each ran 2 trials at a time on a 2-core node)
    assert job_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": "1"}) == 1
    assert job_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_ON_NODE": str(cores + 6)}) == cores
    assert job_cpus({"SLURM_CPUS_ON_NODE": "1"}) == cores  # not inside a job: a stray variable means nothing
    assert job_cpus({"SLURM_JOB_ID": "7"}) == cores  # a job without the variable (a test, an older Slurm)
    assert job_cpus({"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "2"}) == 1
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    assert slot_counts("cpu") == (1, 0)


@pytest.mark.parametrize("environ, device, hides", [
    ({"SLURM_JOB_ID": "7"}, "auto", True),  # a CPU job on a node whose GPUs it can see
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, "auto", True),
    ({"SLURM_JOB_ID": "7"}, "cuda", False),  # the job file asked for the GPUs
    ({"SLURM_JOB_ID": "7"}, "cpu", False),
    ({}, "auto", False),  # not a Slurm job: a workstation uses its GPUs
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "2"}, "auto", False),  # Slurm gave GPU 2
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": ""}, "auto", False),  # already hidden
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1"}, "auto", False),  # given, named by a site's own prolog
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2"}, "auto", False),
])
def test_a_slurm_job_given_no_gpus_runs_on_the_cpu(environ, device, hides, tmp_path, capsys):
    from pruneflow.cluster import keep_to_slurm_gpus

    (tmp_path / "nvidia0").touch()  # this "node" has a GPU: the note names it
    before = dict(environ)
    assert keep_to_slurm_gpus(device, environ, gpu_files=str(tmp_path / "nvidia[0-9]*")) is hides
    assert environ == (dict(before, CUDA_VISIBLE_DEVICES="") if hides else before)
    note = capsys.readouterr().err
    assert ("Slurm gave job 7 no GPUs" in note) is hides and ("resources.device: cuda" in note) is hides
    # a node without GPUs: hidden all the same, but nothing to say
    if hides:
        assert keep_to_slurm_gpus(device, dict(before), gpu_files=str(tmp_path / "none[0-9]*")) is True
        assert capsys.readouterr().err == ""


def test_memory_per_trial_bounds_the_trials_at_a_time():
    """CPU: 8 cores would run 8 one-thread trials; 10 GiB holds two of 4G, each then asking Ray for 4 CPUs. GPU:
    2 GPUs x K=8 would run 16; 12 GiB holds four of 3G, 2 per GPU. Unset, nothing changes."""
    spec, _ = load_spec("jobs/quickstart.yaml", {"resources.memory_per_trial": "4G"})
    plan = plan_packing(spec, cpus=8, gpus=0, memory=(10 * 2**30, "Slurm's --mem"))
    assert plan.slots == 2 and plan.options["num_cpus"] == 4 and plan.threads == 1
    assert "at most 2 trial(s) at a time, 4G (resources.memory_per_trial) each" in plan.note and "10.0 GiB, Slurm's --mem" in plan.note
    roomy = plan_packing(spec, cpus=8, gpus=0, memory=(64 * 2**30, "the machine's RAM"))
    assert roomy.slots == 8 and roomy.options["num_cpus"] == 1 and roomy.note == ""
    spec, _ = load_spec("jobs/quickstart.yaml", {"resources.memory_per_trial": "3G", "resources.trials_per_gpu": 8})
    gpu = plan_packing(spec, cpus=32, gpus=2, memory=(12 * 2**30, "the cgroup's memory limit"))
    assert gpu.per_device == 2 and gpu.slots == 4 and gpu.options["num_gpus"] == 0.5
    assert "per GPU" in gpu.note
    tight = plan_packing(spec, cpus=32, gpus=2, memory=(2 * 2**30, "Slurm's --mem"))
    assert tight.per_device == 1  # never fewer than one: the trial itself says if it does not fit
    spec, _ = load_spec("jobs/quickstart.yaml", {"resources.trials_per_gpu": 8})
    assert plan_packing(spec, cpus=32, gpus=2, memory=(2 * 2**30, "x")).per_device == 8


def test_job_memory_is_the_least_of_ram_slurm_and_cgroups(tmp_path):
    import psutil

    from pruneflow.cluster import cgroup_memory_limit, job_memory

    ram = psutil.virtual_memory().total
    none = tmp_path / "none"
    assert job_memory({}, proc_cgroup=str(none)) == (ram, "the machine's RAM")
    assert job_memory({"SLURM_MEM_PER_NODE": "100"}, proc_cgroup=str(none)) == (100 * 2**20, "Slurm's --mem")
    assert job_memory({"SLURM_MEM_PER_NODE": "0"}, proc_cgroup=str(none))[0] == ram  # --mem=0: the whole node
    per_cpu = {"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "3"}
    assert job_memory(per_cpu, proc_cgroup=str(none)) == (3 * 2**30, "Slurm's --mem-per-cpu x CPUs")
    # cgroup v2: the job's own memory.max and a tighter parent's; 'max' is no limit
    job = tmp_path / "v2" / "system.slice" / "slurmstepd.scope" / "job_7"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("max\n")
    (job.parent / "memory.max").write_text(f"{5 * 2**30}\n")
    (tmp_path / "self-v2").write_text("0::/system.slice/slurmstepd.scope/job_7\n")
    assert cgroup_memory_limit(str(tmp_path / "v2"), str(tmp_path / "self-v2")) == 5 * 2**30
    assert job_memory({}, str(tmp_path / "v2"), str(tmp_path / "self-v2")) == (5 * 2**30, "the cgroup's memory limit")
    # cgroup v1: memory.limit_in_bytes, whose 'unlimited' is a huge number
    v1 = tmp_path / "v1" / "memory" / "slurm" / "uid_0" / "job_7"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * 2**30}\n")
    (v1.parent / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "self-v1").write_text("12:cpu,cpuacct:/slurm/uid_0/job_7\n4:memory:/slurm/uid_0/job_7\n")
    assert cgroup_memory_limit(str(tmp_path / "v1"), str(tmp_path / "self-v1")) == 2 * 2**30
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(str(tmp_path / "v1"), str(tmp_path / "self-v1")) is None
    assert 0 < job_memory()[0] <= ram  # this machine, as it is
    # what the trials may fill: less what this process (torch imported: hundreds of MB) already holds
    from pruneflow.sweep.packing import memory_for_trials

    left, source = memory_for_trials({"SLURM_MEM_PER_NODE": "10000"})
    assert 10000 * 2**20 - left > 100 * 2**20 and "Slurm's --mem less" in source
    assert memory_for_trials({"SLURM_MEM_PER_NODE": "1"})[0] == 0  # never below nothing


def test_train_and_infer_in_a_slurm_job_given_no_gpus_keep_off_the_gpus(tmp_path, dense_ckpt):
    """The other two commands that pick a device: inside a Slurm job given no GPUs (SLURM_JOB_ID alone), 'auto'
    leaves them hidden from CUDA (CUDA_VISIBLE_DEVICES empty) while they run; outside one, nothing changes."""
    script = ("import os, sys; from pruneflow.infer.__main__ import infer; from pruneflow.train import cli; "
              f"infer({str(dense_ckpt)!r}, trials=2, warmup=1); print('infer', repr(os.environ.get('CUDA_VISIBLE_DEVICES'))); "
              "os.environ.pop('CUDA_VISIBLE_DEVICES', None); "
              f"cli({str(tmp_path / 'd.safetensors')!r}, epochs=1); print('train', repr(os.environ.get('CUDA_VISIBLE_DEVICES')))")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_ID")}
    for extra, seen in (({"SLURM_JOB_ID": "7"}, "''"), ({}, "None")):
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                           env=dict(env, **extra), timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"infer {seen}" in p.stdout and f"train {seen}" in p.stdout, p.stdout


def test_memory_per_trial_auto_packs_by_one_measured_trial():
    """auto: one trial measured (host_probe) plus 15 %; the plan says what it measured, and when it binds."""
    spec, _ = load_spec("jobs/quickstart.yaml", {"resources.memory_per_trial": "auto"})
    calls = []

    def host_probe(threads):
        calls.append(threads)
        return dict(host_bytes=2 * 2**30)

    plan = plan_packing(spec, cpus=8, gpus=0, memory=(5 * 2**30, "Slurm's --mem"), host_probe=host_probe)
    assert calls == [1] and plan.slots == 2 and plan.options["num_cpus"] == 4
    assert "at most 2 trial(s) at a time, 2.30 GiB (a trial measured at 2.00 GiB + 15 %" in plan.note
    roomy = plan_packing(spec, cpus=8, gpus=0, memory=(64 * 2**30, "the machine's RAM"), host_probe=host_probe)
    assert roomy.slots == 8 and "the cores allow 8" in roomy.note
    failed = plan_packing(spec, cpus=8, gpus=0, memory=(5 * 2**30, "x"), host_probe=lambda threads: None)
    assert failed.slots == 8 and "did not finish" in failed.note
    assert plan_packing(spec, cpus=1, gpus=0, memory=(1, "x"), host_probe=host_probe).slots == 1
    assert len(calls) == 2  # one core: nothing to hold back, nothing measured
    spec, _ = load_spec("jobs/quickstart.yaml", {"resources.memory_per_trial": "auto", "resources.trials_per_gpu": 4})
    gpu = plan_packing(spec, cpus=8, gpus=1, memory=(1, "x"), host_probe=host_probe)
    assert gpu.per_device == 4 and "measured on CPU nodes only" in gpu.note and len(calls) == 2


def test_heaviest_trial_is_the_least_pruned():
    from pruneflow.spec import grid
    from pruneflow.sweep.packing import heaviest_trial

    spec, _ = load_spec("jobs/quickstart.yaml", {"prune.methods": ["l1"], "prune.sparsities": [0.7, 0.3],
                                                 "prune.mac_targets": [1.5]})
    assert heaviest_trial(grid(spec)).id == "l1-0.30-s0"
    spec, _ = load_spec("jobs/quickstart.yaml", {"prune.methods": ["l1"], "prune.sparsities": [],
                                                 "prune.mac_targets": [3, 1.5]})
    assert heaviest_trial(grid(spec)).id == "l1-x1.50-s0"
    assert heaviest_trial([t for t in grid(spec) if t.arm != "pruned"]).arm == "control"
    # only heavily pruned trials: the control trains the whole model; a level trial keeps every shape
    spec, _ = load_spec("jobs/quickstart.yaml", {"prune.methods": ["l1"], "prune.sparsities": [0.9, 0.8]})
    assert heaviest_trial(grid(spec)).arm == "control"
    spec, _ = load_spec("jobs/quickstart.yaml", {"prune.methods": ["l1", "level"], "prune.sparsities": [0.9, 0.6]})
    assert heaviest_trial(grid(spec)).method == "level"  # every level trial keeps the dense shapes
    spec, _ = load_spec("jobs/quickstart.yaml", {"prune.methods": ["level", "l1"], "prune.sparsities": [0.9, 0.3]})
    assert heaviest_trial(grid(spec)).id == "l1-0.30-s0"  # NNI's speedup on top of 70 % of the model


def test_memory_per_trial_auto_measures_one_trial_alone_then_packs(tmp_path, dense_ckpt):
    """A real sweep: the least-pruned trial runs alone and is kept; the others are packed by its measured peak
    into Slurm's --mem (2000M, less what the driver and Ray hold, holds one); a grown study reuses the
    measurement instead of running one alone."""
    args = ["jobs/quickstart.yaml", "--seeds", "[0]", "--out", tmp_path, "--dense", dense_ckpt, "--prune.methods", "[l1@depgraph]",
            "--finetune.epochs", "1", "--latency.trials", "3", "--resources.memory_per_trial", "auto", "--noprogress",
            "--control", "false"]
    env = {"SLURM_MEM_PER_NODE": "2000", "SLURM_CPUS_PER_TASK": "2"}
    p = run_module("pruneflow.sweep", *args, "--prune.sparsities", "[0.7, 0.3]", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "trial l1@depgraph-0.30-s0 runs alone first" in p.stdout
    assert "at most 1 trial(s) at a time" in p.stdout and "1 at a time on 0 GPU(s) / 2 CPU(s)" in p.stdout
    path = tmp_path / "quickstart" / "shard-0-of-1.h5"
    records = {r["id"]: r for r in read_trials(path)}
    assert len(records) == 3 and all(r["status"] == "done" for r in records.values())
    assert records["l1@depgraph-0.30-s0"]["trials_per_device"] == 1
    spans = sorted((r["started_at"], r["ended_at"]) for r in records.values())
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    kept = json.loads((tmp_path / "quickstart" / "packing-probe.json").read_text())
    (entry,) = kept.values()
    assert 2**27 < entry["host_bytes"] < 2**33  # a Python process with torch: above 128 MiB, below 8 GiB
    p = run_module("pruneflow.sweep", *args, "--prune.sparsities", "[0.7, 0.3, 0.5]", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "runs alone first" not in p.stdout and "memory measured by an earlier sweep" in p.stdout
    assert len(read_trials(path)) == 4
