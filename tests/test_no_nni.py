"""Without NNI (as on Apple silicon, where it has no wheels): DepGraph studies run, NNI methods say why not."""
import glob
import os
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT, assert_clean_error
from pruneflow.results import read_trials


@pytest.fixture(scope="module")
def python_without_nni(tmp_path_factory):
    """A real virtualenv whose packages are this environment's minus NNI: its interpreter, and so Ray's
    workers started with it, cannot import nni."""
    root = tmp_path_factory.mktemp("no-nni")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    src = sysconfig.get_paths()["purelib"]
    site = root / "site"
    site.mkdir()
    for entry in os.listdir(src):
        name = entry.lower().replace("-", "_")
        if name.startswith(("nni", "pruneflow", "__editable__")) or entry.endswith(".pth"):
            continue
        os.symlink(os.path.join(src, entry), site / entry)
    (venv_site,) = glob.glob(str(root / "venv" / "lib" / "python*" / "site-packages"))
    with open(os.path.join(venv_site, "pruneflow-test.pth"), "w") as f:
        f.write(f"{site}\n{ROOT}\n")
    python = str(root / "venv" / "bin" / "python")
    probe = subprocess.run([python, "-c", "import nni"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'nni'" in probe.stderr
    return python


def run(python, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([python, *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_depgraph_quickstart_sweep_runs_without_nni(python_without_nni, tmp_path, dense_ckpt):
    p = run(python_without_nni, "-m", "pruneflow.sweep", "jobs/quickstart_depgraph.yaml", "--out", tmp_path,
            "--dense", dense_ckpt, "--prune.sparsities", "[0.5]", "--finetune.epochs", "1", "--latency.trials", "3",
            "--noprogress")
    assert p.returncode == 0, p.stdout + p.stderr
    records = read_trials(tmp_path / "quickstart_depgraph" / "shard-0-of-1.h5")
    assert sorted(r["id"] for r in records if r["status"] == "done") == sorted(
        ["dense-s0", "control-s0", "l1@depgraph-0.50-s0", "l2@depgraph-0.50-s0", "fpgm@depgraph-0.50-s0"])
    with __import__("h5py").File(tmp_path / "quickstart_depgraph" / "shard-0-of-1.h5", "r") as f:
        assert f["env"].attrs["nni"] == "absent"


def test_nni_methods_say_nni_is_missing(python_without_nni, tmp_path, dense_ckpt):
    p = run(python_without_nni, "-m", "pruneflow.sweep", "jobs/quickstart.yaml", "--seeds", "[0]", "--out", tmp_path)
    line = assert_clean_error(p, "needs NNI", "pruneflow[nni]", "l1@depgraph")
    assert "level" in line and "no unstructured pruning" in line  # the grid's first method; DepGraph has no twin
    assert not (tmp_path / "quickstart" / "dense.safetensors").exists()  # refused before any training
    p = run(python_without_nni, "-m", "pruneflow.prune", "--ckpt", dense_ckpt, "--method", "l1", "--sparsity", "0.5",
            "--out", tmp_path / "p.safetensors")
    assert_clean_error(p, "needs NNI", "l1@depgraph")
