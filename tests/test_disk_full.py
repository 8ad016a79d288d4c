"""A full output disk, on a real tmpfs: the sweep stops with one line naming the path and the free space, keeps
its HDF5 file readable and complete up to its last finished trial, leaves no half-written file, and the same
command finishes the study once there is room. Mounting needs root (CI runs as root)."""

import contextlib
import glob
import os
import subprocess
import sys
import time

import h5py
import pytest

from conftest import ROOT, assert_clean_error
from pruneflow.files import DiskFull, atomic
from pruneflow.results import read_trials
from test_sweep import EXPECTED, SMALL, ids, sweep


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at tmp_path/disk; yields a function that resizes it (MiB)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")

    def resize(mib):
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(mnt)], check=True)

    yield mnt, resize
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def half_files(root):
    return [p for p in glob.glob(f"{root}/**/*", recursive=True) if ".tmp" in os.path.basename(p)]


def test_a_full_disk_stops_the_sweep_in_one_line_and_the_same_command_finishes_it(small_disk):
    mnt, resize = small_disk
    path = mnt / "quickstart" / "shard-0-of-1.h5"

    # 4 MiB: dense training's resume file fits once, not twice
    p = sweep("jobs/quickstart.yaml", mnt)
    assert_clean_error(p, "no space left writing", str(mnt), "MiB free", "run the same command again")
    assert half_files(mnt) == [], half_files(mnt)
    assert read_trials(path) == []  # the results file was made, and is readable

    # room for dense training and the first trials; then another writer fills the disk while the sweep runs
    resize(64)
    proc = subprocess.Popen([sys.executable, "-m", "pruneflow.sweep", "jobs/quickstart.yaml", "--out", str(mnt),
                             *SMALL], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (path.exists() and len(read_trials(path)) >= 2):
        time.sleep(0.2)
    filler = mnt / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    out, err = proc.communicate(timeout=300)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_clean_error(p, "no space left writing", str(mnt / "quickstart"))
    assert half_files(mnt) == []
    with h5py.File(path, "r") as f:  # another reader than pruneflow's opens it
        stored = list(f["trials"])
    records = read_trials(path)
    done = ids(records)
    assert sorted(stored) == sorted(r["id"] for r in records)
    assert 2 <= len(done) < len(EXPECTED), (done, out)
    assert all(r["status"] == "done" for r in records)  # a trial that met the full disk is not stored as failed

    filler.unlink()
    p = sweep("jobs/quickstart.yaml", mnt)
    assert p.returncode == 0, p.stderr
    assert f"{len(done)} skipped" in p.stdout
    assert ids(read_trials(path)) == EXPECTED and len(read_trials(path)) == len(EXPECTED)


def test_atomic_write_on_a_full_disk_keeps_the_old_file(small_disk):
    mnt, _ = small_disk
    target = mnt / "state.bin"
    target.write_bytes(b"old")
    with pytest.raises(DiskFull, match=r"no space left writing .*state\.bin \(\d+\.\d MiB free"):
        with atomic(target) as tmp, open(tmp, "wb") as f:
            f.write(b"x" * (8 << 20))
    assert target.read_bytes() == b"old" and os.listdir(mnt) == ["state.bin"]
    with atomic(target) as tmp, open(tmp, "wb") as f:  # the space the failed write took is back
        f.write(b"x" * (2 << 20))
    assert target.stat().st_size == 2 << 20


def test_torch_save_on_a_full_disk_is_disk_full_not_a_runtime_error(small_disk):
    # torch's writer wraps the OSError in 'RuntimeError: [enforce fail at inline_container.cc] unexpected pos'
    import torch

    mnt, _ = small_disk
    with pytest.raises(DiskFull):
        with atomic(mnt / "resume.pt") as tmp, open(tmp, "wb") as f:
            torch.save({"w": torch.zeros(2_000_000)}, f)
    assert os.listdir(mnt) == []
