"""The sweep with real Ray and real HDF5: completion, sharding, kill -9 safety, failure isolation, concurrency."""
import glob
import os
import signal
import subprocess
import sys
import time

import h5py
import pytest

from conftest import ROOT, assert_clean_error, fault_env, run_module
from pruneflow.results import read_study, read_trials
from pruneflow.spec import grid, load_spec, shard_trials

# A quickstart-shaped grid, small enough for CI: dense + control + 3 methods x 2 sparsities.
SMALL = ["--seeds", "[0]", "--prune.sparsities", "[0.3, 0.7]", "--finetune.epochs", "1", "--latency.trials", "5", "--noprogress"]


def sweep(job, out, *extra, dense=None, env=None):
    args = [job, "--out", out, *SMALL, *extra]
    if dense:
        args += ["--dense", dense]
    return run_module("pruneflow.sweep", *args, env=env)


def ids(records, status="done"):
    return sorted(r["id"] for r in records if r["status"] == status)


EXPECTED = sorted(["dense-s0", "control-s0"] + [f"{m}-{s}-s0" for m in ("level", "l1", "l2") for s in ("0.30", "0.70")])


def test_quickstart_grid_completes_and_h5dump_reads_it(tmp_path, dense_ckpt):
    p = sweep("jobs/quickstart.yaml", tmp_path, dense=dense_ckpt)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "8 done, 0 failed" in p.stdout and "l1-0.70-s0" in p.stdout
    path = tmp_path / "quickstart" / "shard-0-of-1.h5"
    records = read_trials(path)
    assert ids(records) == EXPECTED
    by = {r["id"]: r for r in records}
    assert by["l1-0.70-s0"]["params"] < by["l1-0.30-s0"]["params"] < by["dense-s0"]["params"]
    assert by["level-0.70-s0"]["params"] == by["dense-s0"]["params"]
    assert by["level-0.70-s0"]["weight_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert len(by["l2-0.30-s0"]["latency"]) == 5 and len(by["l2-0.30-s0"]["epochs"]) == 1
    # every other trial timed the dense checkpoint alongside, pair by pair; its speedup is the median pair ratio
    assert by["dense-s0"]["speedup"] == 1.0 and by["dense-s0"]["latency_dense"] == []
    assert all(bool(r["latency_settings"]["channels_last"]) for r in records)  # the CPU default layout
    from pruneflow.infer.device import describe

    assert {r["device_name"] for r in records} == {describe("cpu")}  # each trial's own hardware
    for r in records:
        if r["arm"] != "dense":
            pairs = [d / t for t, d in zip(r["latency"], r["latency_dense"])]
            assert len(r["latency_dense"]) == 5 and r["speedup"] == pytest.approx(sorted(pairs)[2])
    assert by["dense-s0"]["epochs"] == [] and by["control-s0"]["arm"] == "control"
    for r in records:  # resource records: wall time per stage and the memory high-water mark
        assert all(r[f"seconds_{s}"] >= 0 for s in ("load", "prune", "finetune", "evaluate", "time", "save"))
        assert r["peak_memory_bytes"] > 10_000_000 and r["peak_memory_kind"] == "cpu_rss"
    assert 0 < by["l1-0.30-s0"]["seconds_speedup"] < by["l1-0.30-s0"]["seconds_prune"]  # NNI's speed-up, a part
    assert by["level-0.70-s0"]["seconds_speedup"] == 0 == by["dense-s0"]["seconds_speedup"]
    # No timing comparisons between trials (the first trial in a worker also pays its data loading): the
    # dense arm trains no epoch, so its finetune stage is only the epoch-0 evaluation.
    assert all(r["seconds_finetune"] > 0 for r in records)
    for r in records:  # every checkpoint exists and loads with the torch-only loader
        assert os.path.exists(tmp_path / "quickstart" / r["checkpoint"])
    with h5py.File(path, "r") as f:
        assert f.attrs["schema"] == 1 and "finetune" in f.attrs["config"] and f.attrs["job"].startswith("#")
        assert "torch" in f["env"].attrs
    dump = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and 'GROUP "l1-0.30-s0"' in dump.stdout and 'DATASET "latency"' in dump.stdout
    assert 'DATASET "latency_dense"' in dump.stdout
    vals = subprocess.run(["h5dump", "-d", "/trials/l1-0.30-s0/latency", str(path)], capture_output=True, text=True)
    assert vals.returncode == 0 and "(0)" in vals.stdout
    # re-running the same command skips everything
    again = sweep("jobs/quickstart.yaml", tmp_path, dense=dense_ckpt)
    assert again.returncode == 0 and "8 skipped" in again.stdout


def expected(*methods):
    return sorted(["dense-s0", "control-s0"] + [f"{m}-{s}-s0" for m in methods for s in ("0.30", "0.70")])


def test_shards_together_equal_the_whole_grid(tmp_path, dense_ckpt):
    for shard in ("0/2", "1/2"):
        p = sweep("jobs/quickstart.yaml", tmp_path, "--shard", shard, "--prune.methods", "[l1, l2]", dense=dense_ckpt)
        assert p.returncode == 0, p.stderr
    a = read_trials(tmp_path / "quickstart" / "shard-0-of-2.h5")
    b = read_trials(tmp_path / "quickstart" / "shard-1-of-2.h5")
    assert not set(ids(a)) & set(ids(b)) and ids(a) and ids(b)
    assert sorted(ids(a) + ids(b)) == expected("l1", "l2") == ids(read_study(tmp_path / "quickstart"))


def test_injected_failure_is_recorded_while_others_finish(tmp_path, dense_ckpt):
    only_l2 = ["--prune.methods", "[l2]"]
    p = sweep("jobs/quickstart.yaml", tmp_path, "--retries", "1", *only_l2, dense=dense_ckpt,
              env=fault_env(fail=["l2-0.70-s0"]))
    assert p.returncode == 1
    assert "3 done, 1 failed" in p.stdout and "retrying" in p.stderr + p.stdout
    records = read_trials(tmp_path / "quickstart" / "shard-0-of-1.h5")
    failed = [r for r in records if r["status"] == "failed"]
    assert [r["id"] for r in failed] == ["l2-0.70-s0"] and "injected failure" in failed[0]["error"]
    assert failed[0]["attempts"] == 2
    # a re-run without the fault completes the study: every trial exactly once
    p = sweep("jobs/quickstart.yaml", tmp_path, *only_l2, dense=dense_ckpt)
    assert p.returncode == 0 and "3 skipped" in p.stdout
    assert ids(read_trials(tmp_path / "quickstart" / "shard-0-of-1.h5")) == expected("l2")


def test_kill_minus_9_at_several_moments_then_resume(tmp_path, dense_ckpt):
    """SIGKILL the sweep at two different moments; the file always opens, and a re-run completes it
    with every trial exactly once."""
    path = tmp_path / "quickstart" / "shard-0-of-1.h5"
    seen = []
    for wait_for in (0, 3):  # before any trial is stored, after ~3 trials are
        proc = subprocess.Popen([sys.executable, "-m", "pruneflow.sweep", "jobs/quickstart.yaml", "--out", str(tmp_path),
                                 *SMALL, "--dense", dense_ckpt], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 240
        while time.time() < deadline:
            if proc.poll() is not None or (path.exists() and len(read_trials(path)) >= wait_for):
                break
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        records = read_trials(path)  # opens cleanly after the kill
        assert len({r["id"] for r in records}) == len(records)
        seen.append(ids(records))
    assert seen[0] != EXPECTED  # the first kill really interrupted the study
    p = sweep("jobs/quickstart.yaml", tmp_path, dense=dense_ckpt)
    assert p.returncode == 0, p.stderr
    records = read_trials(path)
    assert ids(records) == EXPECTED and len(records) == len(EXPECTED)


def test_sigterm_stops_cleanly_and_keeps_finished_trials(tmp_path, dense_ckpt):
    """scancel or a time limit without submitit: one line, exit 143, no crash dump from Ray's handler, Ray's
    temp dir gone, every finished trial recorded, and the same command resumes."""
    path = tmp_path / "quickstart" / "shard-0-of-1.h5"
    proc = subprocess.Popen([sys.executable, "-m", "pruneflow.sweep", "jobs/quickstart.yaml", "--out", str(tmp_path),
                             *SMALL, "--dense", dense_ckpt], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (path.exists() and len(read_trials(path)) >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "stopped by signal 15" in err and "Traceback" not in err and "SIGTERM received" not in err, err
    assert not glob.glob(f"/tmp/pf-ray-{proc.pid}-*")  # its token and Ray files went with it
    records = read_trials(path)
    assert 2 <= len(records) < len(EXPECTED) and len({r["id"] for r in records}) == len(records)
    p = sweep("jobs/quickstart.yaml", tmp_path, dense=dense_ckpt)
    assert p.returncode == 0, p.stderr
    assert f"{len([r for r in records if r['status'] == 'done'])} skipped" in p.stdout
    assert ids(read_trials(path)) == EXPECTED


def test_two_sweeps_at_once_on_one_machine(tmp_path, dense_ckpt):
    procs = [subprocess.Popen([sys.executable, "-m", "pruneflow.sweep", "jobs/quickstart.yaml", "--out",
                               str(tmp_path / d), *SMALL, "--prune.methods", "[l1]", "--dense", dense_ckpt],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for d in ("a", "b")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "4 done, 0 failed" in out


@pytest.mark.parametrize("args, needles", [
    (["--shard", "3/2"], ["shard 3/2"]),
    (["--prune.sparsities", "[1.5]"], ["outside (0, 1)"]),
    (["--prune.methods", "[]"], ["grid is empty"]),
    (["--prune.sparsitis", "[0.5]"], ["did you mean 'sparsities'"]),
    (["--dense", "/nonexistent/dense.safetensors"], ["--dense /nonexistent/dense.safetensors does not exist"]),
    (["--resources.device", "mps"], ["device 'mps' is not available"]),  # never on Linux
    (["--noprogres"], ["unknown flag --progres: did you mean --progress (or --noprogress)?"]),
    (["--data.dataset", "mnist", "--data.root", "/nonexistent/data"], ["mnist not found under /nonexistent/data"]),
    (["--train.checkpoint", "/nonexistent/d.safetensors"], ["train.checkpoint /nonexistent/d.safetensors does not exist"]),
    (["--shards", "0/2"], ["unknown flag --shards: did you mean --shard?"]),
    (["--progress", "maybe"], ["progress must be true or false"]),  # Fire's string: 'false' was taken as true
])
def test_sweep_bad_input(tmp_path, args, needles):
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, *args)
    assert_clean_error(p, *needles)
    assert not (tmp_path / "quickstart" / "shard-0-of-1.h5").exists()  # refused before anything was written


def test_sweep_bad_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\nprune: [unclosed\n")
    assert_clean_error(run_module("pruneflow.sweep", bad, "--out", tmp_path), "not valid YAML")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_clean_error(run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", blocker), "cannot create")
    # a results file from a newer schema is refused, not overwritten
    study = tmp_path / "r" / "quickstart"
    study.mkdir(parents=True)
    with h5py.File(study / "shard-0-of-1.h5", "w") as f:
        f.attrs["schema"] = 99
        f.create_group("trials")
    assert_clean_error(run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path / "r"), "newer pruneflow")
    with h5py.File(study / "shard-0-of-1.h5", "r") as f:
        assert f.attrs["schema"] == 99


def test_resuming_with_settings_that_change_results_is_refused(tmp_path):
    """A results file only resumes with the settings its trials were made with; the grid may grow and the
    machine may change."""
    import copy

    from pruneflow.errors import UserError
    from pruneflow.results import ResultStore
    from pruneflow.spec import config_of, load_spec, resolve
    from pruneflow.sweep.driver import check_same_settings

    config = config_of(resolve(load_spec("jobs/quickstart.yaml")[0]))
    path = tmp_path / "shard-0-of-1.h5"
    with ResultStore(path, "quickstart", "", config):
        pass
    grown = copy.deepcopy(config)
    grown["prune"]["sparsities"] += [0.95]
    grown["seeds"] = [0, 1]
    grown["resources"].update(device="cpu", trials_per_gpu="auto")
    check_same_settings(path, grown)  # nothing raised
    for section, key, value in (("finetune", "epochs", 7), ("latency", "batch_size", 1), ("data", "dataset", "mnist"),
                                ("performance", "compile", "reduce-overhead"), ("data", "val_size", 0.2),
                                ("prune", "exclude", []), ("train", "checkpoint", "/elsewhere/dense.safetensors")):
        changed = copy.deepcopy(config)
        changed[section][key] = value
        with pytest.raises(UserError) as e:
            check_same_settings(path, changed)
        assert f"{section}.{key} {config[section][key]!r} -> {value!r}" in str(e.value)


def test_an_existing_dense_checkpoint_must_fit_the_study(dense_ckpt):
    # dense_ckpt: train_dense's own checkpoint of a SimpleCNN on digits, 3 epochs, the mnist recipe, seed 0
    from pruneflow.infer.checkpoint import read_meta
    from pruneflow.errors import UserError
    from pruneflow.spec import config_of, load_spec, resolve
    from pruneflow.sweep.driver import check_dense

    meta = read_meta(dense_ckpt)

    def check(given=False, **overrides):
        spec, _ = load_spec("jobs/quickstart.yaml", {"train.epochs": "3", **overrides})
        check_dense("d", meta, 0, resolve(spec), config_of(resolve(spec)), given)

    check()  # trained as this study asks
    with pytest.raises(UserError, match=r"epochs 3 \(the study: 4\).*delete it to train a new one"):
        check(**{"train.epochs": "4"})
    with pytest.raises(UserError, match="recipe .*'lr': 1.0.*'lr': 0.5"):
        check(**{"train.lr": "0.5"})
    check(given=True, **{"train.epochs": "4"})  # --dense: trained elsewhere, any way
    with pytest.raises(UserError, match="arch 'simple_cnn' \\(the study: 'resnet18'\\)"):
        check(given=True, **{"model.arch": "resnet18"})
    with pytest.raises(UserError, match="dataset 'digits'"):
        check(given=True, **{"data.dataset": "synthetic-mnist"})


def test_a_regrown_or_resharded_study_runs_each_trial_once(tmp_path, dense_ckpt):
    """Shards split the grid by position, so more sparsities or another shard count move trials between
    shard files: a trial done in any of them is skipped."""
    base = ["--seeds", "[0]", "--prune.methods", "[l1]", "--nocontrol", "--finetune.epochs", "1", "--latency.trials", "3", "--noprogress",
            "--dense", dense_ckpt]
    for shard in ("0/2", "1/2"):
        p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--shard", shard, *base,
                       "--prune.sparsities", "[0.3, 0.7]")
        assert p.returncode == 0, p.stderr
    outs = []
    for shard in ("0/3", "1/3", "2/3"):
        p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--shard", shard, *base,
                       "--prune.sparsities", "[0.3, 0.5, 0.7]")
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    assert "0 done, 0 failed, 2 skipped" in outs[0] and "0 done, 0 failed, 1 skipped" in outs[1]
    assert "1 done, 0 failed, 0 skipped" in outs[2]  # l1-0.50, the only new trial
    study = tmp_path / "quickstart"
    ids_per_file = [r["id"] for f in sorted(study.glob("shard-*.h5")) for r in read_trials(f)]
    assert sorted(ids_per_file) == ["dense-s0", "l1-0.30-s0", "l1-0.50-s0", "l1-0.70-s0"]  # each once
    with h5py.File(study / "shard-1-of-3.h5", "r") as f:  # the file describes the run that wrote it
        assert '"sparsities": [0.3, 0.5, 0.7]' in f.attrs["config"]
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", tmp_path, "--shard", "0/4", *base,
                   "--prune.sparsities", "[0.3, 0.5, 0.7, 0.9]", "--finetune.epochs", "3")  # its own file is new
    assert_clean_error(p, "shard-0-of-2.h5 holds trials made with other settings: finetune.epochs 1 -> 3")


def test_sweep_sh_reruns_chosen_tasks_of_a_larger_array(tmp_path, dense_ckpt):
    # `PRUNEFLOW_SHARDS=2 sbatch --array=1 slurm/sweep.sh JOB` re-runs shard 1 of 2 (Slurm then says the array
    # has 1 task, numbered 1); run here as that task, without Slurm
    env = dict(os.environ, PRUNEFLOW_VENV=os.path.dirname(os.path.dirname(sys.executable)), PRUNEFLOW_OUT=str(tmp_path),
               SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="1",
               PRUNEFLOW_ARGS=f"--prune.methods [l1] --prune.sparsities [0.5] --finetune.epochs 1 --latency.trials 3 "
                              f"--dense {dense_ckpt}")
    bad = subprocess.run(["bash", "slurm/sweep.sh", "jobs/quickstart.yaml"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=60)
    assert bad.returncode == 2 and "array task 1 is not one of 1 shard(s)" in bad.stderr and "PRUNEFLOW_SHARDS=8" in bad.stderr
    p = subprocess.run(["bash", "slurm/sweep.sh", "jobs/quickstart.yaml"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(env, PRUNEFLOW_SHARDS="2"), timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert os.listdir(tmp_path / "quickstart").count("shard-1-of-2.h5") == 1
    spec, _ = load_spec("jobs/quickstart.yaml", {"prune.methods": ["l1"], "prune.sparsities": [0.5]})
    assert ids(read_trials(tmp_path / "quickstart" / "shard-1-of-2.h5")) == sorted(
        t.id for t in shard_trials(grid(spec), "1/2"))
