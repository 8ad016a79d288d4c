"""The benchmarks run in CI-sized mode so they cannot rot (their full-size figures live in docs/)."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, assert_clean_error
from pruneflow.spec import grid, load_spec


def test_backends_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/backends.py", "--quick", "--trials", "2"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")]
    assert {r[1] for r in rows} == {"nni", "depgraph"} and len(rows) == 4
    for r in rows:
        nominal, achieved, mac_reduction = float(r[3]), float(r[4]), float(r[5])
        assert achieved == nominal == 0.5 and mac_reduction > 3  # SimpleCNN: no coupled channels
    assert "# device cpu" in p.stdout


def test_cpu_accounting_charges_the_command_and_passes_its_exit_code():
    # 0.6 s of CPU, then a pause: a process is charged what the last sample before its exit saw
    busy = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.6: pass'); time.sleep(0.6)"
    p = subprocess.run([sys.executable, "benchmarks/cpu_accounting.py", "--interval", "0.2", "--", sys.executable,
                        "-c", busy], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = (re.match(r"\s*(\d+\.\d) s  (.+)$", ln) for ln in p.stdout.splitlines())
    charged = {m.group(2): float(m.group(1)) for m in rows if m}
    assert 0.5 <= charged["the command"] < 5, p.stdout  # its 0.6 s of CPU (plus the interpreter's start)
    p = subprocess.run([sys.executable, "benchmarks/cpu_accounting.py", "--", sys.executable, "-c", "exit(3)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 3


def test_projection_benchmark_quick():
    # the real sweep of the quickstart study, 2 measured epochs per run; the projection's own arithmetic holds:
    # dense = train.epochs x the steady epoch + the first epoch's excess, and the study = dense + trials
    p = subprocess.run([sys.executable, "benchmarks/projection.py", "jobs/quickstart.yaml", "--quick", "--epochs", "2"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    dense = re.search(r"dense epoch \(alone; 1st \+(\d+) s\)\s+([\d.]+)s\s+(\d+)", p.stdout)
    trials = re.search(r"trials, \d+ at once \((\d+) in the grid\)\s+(\d+)", p.stdout)
    whole = re.search(r"whole study\s+(\d+)", p.stdout)
    assert dense and trials and whole, p.stdout
    excess, epoch, dense_s = int(dense[1]), float(dense[2]), int(dense[3])
    spec = load_spec("jobs/quickstart.yaml")[0]
    seeds = len(spec.seeds)  # one dense model per seed
    assert epoch > 0 and abs(dense_s - seeds * (spec.train.epochs * epoch + excess)) <= seeds * (0.05 * spec.train.epochs + 1.5)
    assert int(trials[1]) == len(grid(spec))
    assert abs(int(whole[1]) - (dense_s + int(trials[2]))) <= 1


def test_benchmarks_refuse_bad_settings_in_one_line_before_measuring():
    for script, args, needle in (("train_throughput.py", ["--quick", "--compile", "reduce-overhead,fast"], "fast"),
                                 ("projection.py", ["jobs/quickstart.yaml", "--quick", "--precision", "fp16"], "fp16"),
                                 ("packing.py", ["--quick", "--compile", "cudagraph"], "cudagraph")):
        p = subprocess.run([sys.executable, f"benchmarks/{script}", *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=120)
        assert_clean_error(p, needle)
        assert not any(w in p.stdout for w in ("img/s", "projected", "span", "s/step"))  # nothing measured first


def test_nni_prune_time_benchmark_quick():
    # both ways of each part run and agree (the script stops when groups or pruned models differ)
    p = subprocess.run([sys.executable, "benchmarks/nni_prune_time.py", "--models", "resnet18", "--rounds", "1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[1]: [float(x) for x in ln.split()[2:]] for ln in p.stdout.splitlines() if ln.startswith("resnet18")}
    assert sorted(rows) == ["grouping", "speedup"]
    for nni, ours, ratio in rows.values():
        assert nni > 0 and ours > 0 and ratio == pytest.approx(nni / ours, rel=0.1)  # printed to 2 decimals
    assert_clean_error(subprocess.run([sys.executable, "benchmarks/nni_prune_time.py", "--models", "simple_cnn"],
                                      capture_output=True, text=True, cwd=ROOT), "ResNets")


@pytest.mark.parametrize("script", ["gpu_suite.sh", "device_wheels.sh", "sweep_auto_check.sh"])
def test_gpu_session_scripts_pass_bash_n_and_shellcheck(script):
    # they run only where a GPU is lent (minutes, at most once a session): a slip must show here, not there
    for cmd in (["bash", "-n", f"benchmarks/{script}"], ["shellcheck", f"benchmarks/{script}"]):
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr


def test_trial_memory_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/trial_memory.py", "--quick", "--steps", "2"], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")]
    stages = [(r[2], " ".join(r[3:-1])) for r in rows]
    assert stages == [("pruned", "imports"), ("pruned", "model"), ("pruned", "prune (NNI)"),
                      ("pruned", "2 fine-tune steps"), ("control", "imports"), ("control", "model"),
                      ("control", "2 fine-tune steps")]
    for arm in ("pruned", "control"):  # a peak only grows, and torch alone is hundreds of MB
        peaks = [float(r[-1]) for r in rows if r[2] == arm]
        assert peaks == sorted(peaks) and peaks[0] > 100
    assert "resources.memory_per_trial:" in p.stdout


def test_deploy_latency_benchmark_quick():
    # every runtime available here, dense and pruned paired per runtime: one row per runtime x batch
    p = subprocess.run([sys.executable, "benchmarks/deploy_latency.py", "--quick", "--trials", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")]
    assert sorted((r[2], r[3]) for r in rows) == [("compiled", "1"), ("compiled", "8"), ("eager", "1"), ("eager", "8"),
                                                  ("onnxruntime", "1"), ("onnxruntime", "8")]
    for r in rows:
        speedup, mac_reduction, efficiency = float(r[6]), float(r[8]), float(r[9])
        assert mac_reduction > 3 and abs(efficiency - speedup / mac_reduction) < 0.01
    bad = subprocess.run([sys.executable, "benchmarks/deploy_latency.py", "--quick", "--runtimes", "tensorrt"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_clean_error(bad, "tensorrt")
