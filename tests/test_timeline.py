"""The resource timeline on a small real sweep: the report draws one figure per sweep run whose bars are the
trials' recorded start and end and whose lines are the HDF5 utilisation series; summary.md's Resources
section repeats every trial's stage times; a file from before utilisation sampling still reports, with a note."""
import os
import re
import shutil

import h5py
import numpy as np
import pytest

from conftest import quickstart_study, report_of, run_module
from pruneflow.figures import METHOD_COLORS, METHOD_STYLES, mstyle
from pruneflow.results import read_trials, read_utilisation
from pruneflow.timeline import STAGES, assign_lanes, fig_timeline

# one worker runs this module, so its module-scoped study is built once (xdist gives each worker its own)
pytestmark = pytest.mark.xdist_group("timeline")

# dense + control + l1@depgraph x {0.3, 0.6}, 2 slots on 2 cores, sampled every 0.25 s (4-40 s)
SMALL = ["--seeds", "[0]", "--prune.methods", "[l1@depgraph]", "--prune.sparsities", "[0.3,0.6]", "--train.epochs", "1",
         "--finetune.epochs", "1", "--latency.trials", "5", "--resources.sample_interval_s", "0.25", "--noprogress"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, dense_ckpt):
    return quickstart_study(tmp_path_factory.mktemp("timeline"), dense_ckpt, *SMALL)


@pytest.fixture(scope="module")
def report(study):
    return report_of(study, "--noarch")


@pytest.fixture(scope="module")
def shard(study):
    path = str(study / "shard-0-of-1.h5")
    (run,) = read_utilisation(path)
    return path, run, read_trials(path)


def test_one_timeline_figure_per_sweep_run(report, shard):
    p, out = report
    for fmt in ("png", "pdf"):
        path = out / f"timeline-shard-0-of-1-run0.{fmt}"
        data = path.read_bytes()
        assert len(data) > (20000 if fmt == "png" else 8000) and str(path) in p.stdout, (path, len(data))
        if fmt == "png":
            import matplotlib.image

            h, w = matplotlib.image.imread(path).shape[:2]
            assert h >= 500 and w >= 900, (h, w)
        else:
            assert data[:5] == b"%PDF-"
    assert "[timeline-shard-0-of-1-run0.png]" in (out / "summary.md").read_text()


def test_bars_are_the_trials_start_and_end(shard):
    path, run, trials = shard
    fig, data = fig_timeline(path, run, trials)
    t0 = run["attrs"]["started_at"]
    assert data["t0"] == t0
    bars = {b["id"]: b for b in data["bars"]}
    assert sorted(bars) == sorted(t["id"] for t in trials)
    rects = {p.get_gid(): p for ax in fig.axes for p in ax.patches if p.get_gid()}
    for t in trials:
        b, r = bars[t["id"]], rects[t["id"]]
        assert b["start"] == pytest.approx(t["started_at"] - t0, abs=1e-9) and b["start"] >= 0
        assert b["end"] == pytest.approx(t["ended_at"] - t0, abs=1e-9)
        assert r.get_x() == pytest.approx(b["start"], abs=1e-9) and r.get_width() == pytest.approx(b["end"] - b["start"])
        # the stages back to back, ending at the trial's end, each as long as recorded
        assert [s[0] for s in b["stages"]] == list(STAGES)
        for k, start, seconds in b["stages"]:
            assert seconds == pytest.approx(t[f"seconds_{k}"], abs=1e-9)
            assert rects[f"{t['id']}:{k}"].get_x() == pytest.approx(start)
            assert rects[f"{t['id']}:{k}"].get_width() == pytest.approx(seconds)
        assert b["stages"][-1][1] + b["stages"][-1][2] == pytest.approx(b["end"])
        assert b["stages"][0][1] >= b["start"] - 1e-6  # the stages fit inside the trial
    # lanes: never two trials at once on one lane, no more lanes than slots, and the 2 slots were both used
    for lane in {b["lane"] for b in bars.values()}:
        spans = sorted((b["start"], b["end"]) for b in bars.values() if b["lane"] == lane)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    assert {b["lane"] for b in bars.values()} == {0, 1} == set(range(run["attrs"]["slots"]))
    assert run["attrs"]["host"] in data["title"] and "2 trial(s) per device" in data["title"]


def test_lines_are_the_hdf5_series(shard):
    path, run, trials = shard
    fig, data = fig_timeline(path, run, trials)
    with h5py.File(path, "r") as f:
        g = f["utilisation/run-0"]
        cols = {k: g[k][()] for k in g}
        x = cols["time"] - g.attrs["started_at"]
        total = g.attrs.get("memory_total_bytes")
    gpus = sorted(k[:-len("_util_percent")] for k in cols if k.endswith("_util_percent"))
    expect = ({"CPU (all cores)": cols["cpu_percent"]} if "cpu_percent" in cols else {})
    if gpus:
        expect.update({lab: cols[f"{g}_util_percent"] for g in gpus for lab in data["panels"][0]["lines"]
                       if lab.startswith(g + " ") and lab.endswith(" util")})
        expect.update({lab: cols[f"{g}_memory_used_bytes"] / 2**30 for g in gpus for lab in data["panels"][1]["lines"]
                       if lab.startswith(g + " ") and lab.endswith(" memory")})
    else:
        expect["RAM used"] = cols["memory_used_bytes"] / 2**30
    drawn = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    returned = {k: v for p in data["panels"] for k, v in p["lines"].items()}
    # a real series, sampled through the run at (about) its 0.25 s interval: the run's length depends on the
    # machine (4 s on a fast one, 40 s on a loaded one), so the count is checked against it, not a constant
    assert set(expect) <= set(returned) and len(x) >= 5 and len(x) >= 0.5 * x[-1] / 0.25, (len(x), x[-1])
    for label, y in expect.items():
        np.testing.assert_array_equal(returned[label][0], x)
        np.testing.assert_array_equal(returned[label][1], y)
        np.testing.assert_array_equal(drawn[label].get_xdata(), x)
        np.testing.assert_array_equal(drawn[label].get_ydata(), y)
    if not gpus:  # the RAM total as a dashed line
        assert drawn["RAM total"].get_ydata()[0] == pytest.approx(total / 2**30)
        assert drawn["RAM total"].get_linestyle() == "--"


def _num(cell):
    return float(cell.replace(",", ""))


def test_resources_section_equals_the_hdf5_values(report, shard):
    path, run, trials = shard
    text = (report[1] / "summary.md").read_text()
    section = text.split("## Resources")[1].split("\n## ")[0]
    head, rows = None, {}
    for line in section.splitlines():
        if line.startswith("|") and not set(line) <= set("|-"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if head is None:
                head = cells
            else:
                rows[cells[0]] = dict(zip(head, cells))
    assert head == ["trial"] + [f"{k} s" for k in STAGES] + ["wall s"]
    with h5py.File(path, "r") as f:
        attrs = {tid: dict(g.attrs) for tid, g in f["trials"].items()}
    assert set(rows) == set(attrs) | {"sum"}
    for tid, a in attrs.items():
        for k in STAGES:
            assert _num(rows[tid][f"{k} s"]) == pytest.approx(a[f"seconds_{k}"], abs=5e-4)
        assert _num(rows[tid]["wall s"]) == pytest.approx(a["wall_s"], abs=5e-4)
    for k in STAGES:
        assert _num(rows["sum"][f"{k} s"]) == pytest.approx(sum(a[f"seconds_{k}"] for a in attrs.values()), abs=5e-4)
    # the run line: samples, mean / max CPU; the largest trial peak memory with its kind
    cpu = run["series"]["cpu_percent"]
    assert f"{len(cpu)} samples every 0.25 s" in section
    m = re.search(r"CPU \(all cores\) mean ([\d.]+) %, max ([\d.]+) %", section)
    assert float(m.group(1)) == pytest.approx(np.mean(cpu), abs=0.051)
    assert float(m.group(2)) == pytest.approx(np.max(cpu), abs=0.051)
    top = max(attrs, key=lambda t: attrs[t]["peak_memory_bytes"])
    m = re.search(r"peak memory of a trial: ([\d,]+) bytes \([\d.]+ GiB, (\w+)\) in (\S+)", section)
    assert _num(m.group(1)) == attrs[top]["peak_memory_bytes"] and m.group(2) == attrs[top]["peak_memory_kind"]
    assert m.group(3) == top


def test_a_file_without_utilisation_still_reports(study, tmp_path):
    copy = tmp_path / "old"
    copy.mkdir()
    shutil.copy(study / "shard-0-of-1.h5", copy)
    with h5py.File(copy / "shard-0-of-1.h5", "a") as f:
        del f["utilisation"]
    p = run_module("pruneflow.report", copy, "--noarch", "--format", "png", "--only", "methods,timeline,summary")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "note: shard-0-of-1.h5 holds no utilisation samples" in p.stdout
    files = os.listdir(copy / "report")
    assert not [f for f in files if f.startswith("timeline")] and "summary.md" in files
    text = (copy / "report" / "summary.md").read_text()
    section = text.split("## Resources")[1].split("\n## ")[0]
    assert "holds no utilisation samples" in section and "| sum |" in section  # the stage times are still there
    assert "holds no utilisation samples" in text.split("## Notes")[1].split("\n## ")[0]


def test_every_method_label_has_a_stable_style():
    for m in METHOD_COLORS.keys() & {"level", "l1", "l2", "fpgm"}:  # the NNI methods look as they always did
        marker, dash = METHOD_STYLES[m]
        assert mstyle(m) == dict(color=METHOD_COLORS[m], marker=marker, label=m, linestyle=dash)
        assert mstyle(m, line=False) == dict(color=METHOD_COLORS[m], marker=marker, label=m)
    for m in ("l1", "l2", "fpgm", "taylor", "slim"):
        dg = mstyle(f"{m}@depgraph")
        assert dg["color"] == METHOD_COLORS[m] and dg["marker"] == METHOD_STYLES[m][0]
        assert dg["linestyle"] != METHOD_STYLES[m][1] and dg["markerfacecolor"] == "white"
        assert mstyle(f"{m}@depgraph", line=False)["facecolors"] == "none"
    assert mstyle("new@depgraph") == mstyle("new@depgraph") and mstyle("new")["color"] is not None


def test_lanes_take_the_lowest_free_slot():
    t = [dict(id=i, started_at=s, ended_at=e) for i, s, e in
         (("a", 0, 10), ("b", 0, 4), ("c", 4, 6), ("d", 6, 12), ("e", 10, 11), ("f", 11, 13))]
    assert assign_lanes(t) == {"a": 0, "b": 1, "c": 1, "d": 1, "e": 0, "f": 0}


def test_gpu_columns_give_gpu_panels(shard):
    """CI has no GPU: the same run with NVML-style columns added draws per-GPU util and memory (total dashed)."""
    path, run, trials = shard
    n = len(run["series"]["time"])
    series = dict(run["series"], gpu0_util_percent=np.linspace(0, 100, n), gpu0_memory_used_bytes=np.full(n, 2.0**33))
    attrs = dict(run["attrs"], gpus="NVIDIA H100 80GB HBM3", gpu_memory_total_bytes=str(80 * 2**30))
    fig, data = fig_timeline(path, dict(run, series=series, attrs=attrs), trials)
    util, mem = data["panels"]
    assert util["ylabel"] == "GPU util (%)" and mem["ylabel"] == "GPU memory (GiB)"
    np.testing.assert_array_equal(util["lines"]["gpu0 (NVIDIA H100 80GB HBM3) util"][1], series["gpu0_util_percent"])
    np.testing.assert_array_equal(mem["lines"]["gpu0 (NVIDIA H100 80GB HBM3) memory"][1], np.full(n, 8.0))
    assert mem["limits"] == {"gpu0 total": 80.0} and "1 GPU(s): NVIDIA H100 80GB HBM3" in data["title"]
