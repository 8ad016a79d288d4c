"""The report on a small real study: every figure is a valid image, summary.md equals the HDF5 values, a
partial study (a shard missing, a trial failed) still reports and says so, device JSONs add the devices
figure, and bad input gives one clean error line."""
import glob
import json
import os
import shutil
import subprocess
import sys

import h5py
import pytest

from conftest import ROOT, assert_clean_error, fault_env, quickstart_study, report_of, run_module
from pruneflow.study import pareto_front
from pruneflow.results import read_study

# one worker runs this module, so its module-scoped study is built once (xdist gives each worker its own)
pytestmark = pytest.mark.xdist_group("report")

# The sweep's small grid: dense + control + level/l1/l2 x {0.3, 0.7}, one seed (about 35 s on 2 CPU cores).
SMALL = ["--seeds", "[0]", "--prune.sparsities", "[0.3, 0.7]", "--finetune.epochs", "1", "--latency.trials", "5", "--train.epochs", "2",
         "--noprogress"]
METHODS = ("level", "l1", "l2")


@pytest.fixture(scope="module")
def study(tmp_path_factory, dense_ckpt):
    return quickstart_study(tmp_path_factory.mktemp("results"), dense_ckpt, *SMALL)


@pytest.fixture(scope="module")
def report(study):
    return report_of(study)


@pytest.fixture(scope="module")
def partial(study, tmp_path_factory, dense_ckpt):
    """Shard 0 of 2 only (so shard 1/2 and its trials are missing), with l1-0.30-s0 failing for good."""
    out = tmp_path_factory.mktemp("partial")
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", out, *SMALL, "--shard", "0/2", "--retries", "0",
                   "--dense", dense_ckpt, env=fault_env(fail=["l1-0.30-s0"]))
    assert p.returncode == 1 and "3 done, 1 failed" in p.stdout, p.stdout + p.stderr
    return out / "quickstart"


def check_image(path):
    data = open(path, "rb").read()
    assert len(data) > 5000, path
    if str(path).endswith(".png"):
        assert data[:8] == b"\x89PNG\r\n\x1a\n", path
        import matplotlib.image

        h, w = matplotlib.image.imread(path).shape[:2]
        assert h >= 300 and w >= 500, (path, h, w)
    else:
        assert data[:5] == b"%PDF-" and b"%%EOF" in data[-64:], path


def trial_rows(summary):
    """{trial id: {column: cell}} from every trial table of summary.md."""
    rows, head = {}, None
    for line in summary.splitlines():
        if not line.startswith("|"):
            head = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if head is None:
            head = cells
        elif head[0] == "trial" and "status" in head and not set(line) <= set("|-"):
            rows[cells[0]] = dict(zip(head, cells))
    return rows


def num(cell):
    """The number a cell starts with: '94.4 [89.4, 97.2]' -> 94.4."""
    return float(cell.split(" [")[0].replace(",", "").replace("+", ""))


def test_every_figure_is_a_valid_image(report):
    p, out = report
    names = [f"time-simple-cnn-{m}-" for m in METHODS] + ["pareto-simple-cnn-", "size-simple-cnn-", "methods-simple-cnn"]
    for fmt in ("png", "pdf"):
        for name in names:
            found = glob.glob(str(out / f"{name}*.{fmt}"))
            assert len(found) == 1, (name, fmt, os.listdir(out))
            check_image(found[0])
            assert found[0] in p.stdout  # the terminal lists what was written
    assert not glob.glob(str(out / "devices-*")) and "only one device" in p.stdout
    assert (out / "summary.md").exists() and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_summary_numbers_equal_the_hdf5_values(report, study):
    text = (report[1] / "summary.md").read_text()
    rows = trial_rows(text)
    records = {r["id"]: r for r in read_study(study)}
    assert sorted(rows) == sorted(records)
    dense, control = records["dense-s0"], records["control-s0"]
    for tid, r in records.items():
        row = rows[tid]
        assert row["status"] == "done" and num(row["sparsity"]) == pytest.approx(r["sparsity"], abs=0.005)
        assert num(row["params"]) == r["params"] and num(row["MACs"]) == r["macs"]
        median, std = (num(x) for x in row["latency ms (median ± std)"].split("±"))
        assert median == pytest.approx(1e3 * r["latency_median"], abs=5e-4)
        assert std == pytest.approx(1e3 * r["latency_std"], abs=5e-4)
        assert num(row["speedup × [95 %]"]) == pytest.approx(r["speedup"], abs=0.005)  # measured side by side
        assert num(row["train acc %"]) == pytest.approx(100 * r["train_acc"], abs=0.005)
        assert num(row["val acc % [95 %]"]) == pytest.approx(100 * r["val_acc"], abs=0.05)
        assert num(row["test acc % [95 %]"]) == pytest.approx(100 * r["test_acc"], abs=0.05)
        lo, hi = (num(x) for x in row["test acc % [95 %]"].split("[")[1].rstrip("]").split(","))
        assert lo <= 100 * r["test_acc"] <= hi  # its Wilson interval
        assert num(row["Δ test vs dense (pp)"]) == pytest.approx(100 * (r["test_acc"] - dense["test_acc"]), abs=0.051)
        assert num(row["Δ test vs control (pp)"]) == pytest.approx(100 * (r["test_acc"] - control["test_acc"]),
                                                                   abs=0.051)
    notes = text.split("## Notes")[1].split("\n## ")[0]
    assert "missing" not in notes and "failed" not in notes and "## Failed trials" not in text
    # provenance: versions from /env, the job file, the resolved config (with the overrides), print(model)
    with h5py.File(study / "shard-0-of-1.h5", "r") as f:
        torch_version = f["env"].attrs["torch"]
    assert f"torch {torch_version}" in text and "study: quickstart" in text and '"epochs": 1' in text
    # default --show: the sparsest trial of the first method that changes shapes (level keeps them)
    assert "### dense-s0" in text and "### l1-0.70-s0" in text and "Conv2d(1, 16" in text


def without_pairing(study, tmp_path):
    """A copy of ``study`` as written before trials timed the dense model alongside: no speedup attr, no
    latency_dense."""
    old = tmp_path / "quickstart"
    shutil.copytree(study, old, ignore=shutil.ignore_patterns("report", "checkpoints"))
    with h5py.File(old / "shard-0-of-1.h5", "r+") as f:
        for g in f["trials"].values():
            del g.attrs["speedup"]
            if "latency_dense" in g:
                del g["latency_dense"]
    return old


def test_files_without_paired_timing_fall_back_to_the_ratio_of_medians(study, tmp_path):
    old = without_pairing(study, tmp_path)
    p = run_module("pruneflow.report", old, "--format", "png", "--noarch")
    assert p.returncode == 0, p.stdout + p.stderr
    rows, records = trial_rows((old / "report" / "summary.md").read_text()), {r["id"]: r for r in read_study(old)}
    dense = records["dense-s0"]
    for tid, r in records.items():
        assert "speedup" not in r and r["latency_dense"] == []
        assert num(rows[tid]["speedup × [95 %]"]) == pytest.approx(dense["latency_median"] / r["latency_median"], abs=0.005)
    # the benchmark comparing both estimates needs the paired samples: one line, exit 2
    assert_clean_error(subprocess.run([sys.executable, "benchmarks/speedup_pairing.py", old / "shard-0-of-1.h5"],
                                      capture_output=True, text=True, cwd=ROOT), "timed alongside")


def plotted(study_dir):
    """What the time figure (l1) and the Pareto figure draw for ``study_dir``: the dense-alongside line's points,
    and the Pareto latency axis' label and points (x, accuracy %) per trial id."""
    import matplotlib

    matplotlib.use("Agg")
    from pruneflow.figures import DENSE_ALONGSIDE, fig_pareto, fig_time
    from pruneflow.study import load_study

    s = load_study(study_dir)
    key = s.records[0]["device_key"]
    ax = fig_time(s, "simple_cnn", "digits", "l1", key, s.records).axes[0]
    alongside = [line.get_ydata() for line in ax.get_lines() if line.get_label() == DENSE_ALONGSIDE]
    ax = fig_pareto(s, "simple_cnn", "digits", list(METHODS), key, s.records).axes[0]
    points = [tuple(p) for c in ax.collections for p in c.get_offsets()]
    return s.records, alongside, ax.get_xlabel(), points


def test_pareto_points_carry_their_95_percent_intervals(study):
    # a point without an interval is not a result: each trial's accuracy bar is its Wilson interval on val,
    # its latency bar the bootstrap interval of its timed pairs, inverted (x = 1 / speedup)
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.collections import LineCollection
    from pruneflow.compare import accuracy_interval, speedup_interval
    from pruneflow.figures import fig_pareto
    from pruneflow.study import load_study

    s = load_study(study)
    key = s.records[0]["device_key"]
    ax = fig_pareto(s, "simple_cnn", "digits", list(METHODS), key, s.records).axes[0]
    segs = [seg for c in ax.collections if isinstance(c, LineCollection) for seg in c.get_segments()]
    vertical = [(a[0], a[1], b[1]) for a, b in segs if a[0] == b[0] and a[1] != b[1]]
    horizontal = [(a[1], a[0], b[0]) for a, b in segs if a[1] == b[1] and a[0] != b[0]]
    pruned = [r for r in s.records if r["arm"] == "pruned" and r["status"] == "done"]
    assert pruned
    for r in pruned:
        _, lo, hi, n = accuracy_interval(r, "val")
        x, y = 1 / r["speedup"], 100 * r["val_acc"]
        assert n > 0 and 100 * lo < y < 100 * hi
        assert any(v == pytest.approx((x, 100 * lo, 100 * hi)) for v in vertical), r["id"]
        _, slo, shi = speedup_interval([r])
        assert any(h == pytest.approx((y, 1 / shi, 1 / slo)) for h in horizontal), r["id"]


def test_figures_plot_the_latencies_measured_side_by_side(study, tmp_path):
    records, alongside, xlabel, points = plotted(study)
    # the time figure draws the dense model as timed next to each l1 trial, in ms, sparsity by sparsity
    l1 = sorted((r for r in records if r["method"] == "l1"), key=lambda r: r["sparsity"])
    assert len(alongside) == 1 and list(alongside[0]) == pytest.approx(
        [1e3 * sum(r["latency_dense"]) / len(r["latency_dense"]) for r in l1])
    # the Pareto front's latency axis is 1 / speedup: the dense model at 1, every trial where its pairs put it
    assert "1 / speedup" in xlabel
    for r in records:
        assert (pytest.approx(1 / r["speedup"]), pytest.approx(100 * r["val_acc"])) in points
    assert (1.0, pytest.approx(100 * next(r for r in records if r["arm"] == "dense")["val_acc"])) in points
    # files from before pairing: no dense line, and the Pareto axis falls back to absolute milliseconds
    old = without_pairing(study, tmp_path)
    records, alongside, xlabel, points = plotted(old)
    assert alongside == [] and xlabel == "inference time per batch (ms, mean)"
    for r in records:
        assert (pytest.approx(1e3 * r["latency_mean"]), pytest.approx(100 * r["val_acc"])) in points


def test_speedup_pairing_benchmark_prints_both_estimates(study):
    p = subprocess.run([sys.executable, "benchmarks/speedup_pairing.py", study / "shard-0-of-1.h5"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    records = {r["id"]: r for r in read_study(study)}
    rows = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines() if ln.split() and ln.split()[0] in records}
    assert sorted(rows) == sorted(t for t, r in records.items() if r["arm"] != "dense")
    for tid, row in rows.items():
        separate = records["dense-s0"]["latency_median"] / records[tid]["latency_median"]
        assert float(row[-2]) == pytest.approx(separate, abs=0.006)
        assert float(row[-1]) == pytest.approx(records[tid]["speedup"], abs=0.006)
    # control + level at 0.3 and 0.7: the trials whose true speedup is 1
    assert "true speedup 1), 3 of them" in p.stdout and "  separate  median" in p.stdout and "  paired    median" in p.stdout


def test_partial_study_reports_the_missing_shard_and_the_failure(partial):
    p = run_module("pruneflow.report", partial, "--format", "png")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "shard 1/2 is missing" in p.stdout and "trial l1-0.30-s0 failed" in p.stdout
    out = partial / "report"
    for f in glob.glob(str(out / "*.png")):
        check_image(f)
    assert len(glob.glob(str(out / "time-simple-cnn-*.png"))) == 2  # l1 has no finished trial in shard 0
    assert not glob.glob(str(out / "*.pdf"))
    text = (out / "summary.md").read_text()
    # shard 0/2 holds dense, level-0.30, l1-0.30, l2-0.30; shard 1/2 the other four
    assert "shard 1/2 is missing (shard-1-of-2.h5 not found)" in text
    for tid in ("control-s0", "level-0.70-s0", "l1-0.70-s0", "l2-0.70-s0"):
        assert tid in text.split("## Notes")[1].split("##")[0]
    rows = trial_rows(text)
    assert rows["l1-0.30-s0"]["status"] == "failed" and rows["l1-0.30-s0"]["params"] == ""
    assert rows["l2-0.30-s0"]["status"] == "done" and rows["l2-0.30-s0"]["Δ test vs control (pp)"] == ""
    failed = text.split("## Failed trials")[1]
    assert "l1-0.30-s0" in failed and "injected failure" in failed


def test_device_json_adds_the_devices_figure(study, tmp_path):
    copy = tmp_path / "quickstart"
    shutil.copytree(study, copy, ignore=shutil.ignore_patterns("report"))
    p = run_module("pruneflow.infer", "--ckpt", copy / "checkpoints", "--device", "cpu", "--trials", 3)
    assert p.returncode == 0, p.stdout + p.stderr
    (doc_path,) = glob.glob(str(copy / "checkpoints" / "devices" / "*.json"))
    doc = json.load(open(doc_path))
    out = tmp_path / "figs"
    for _ in range(2):  # a re-run replaces the files in place
        p = run_module("pruneflow.report", copy, "--out", out, "--format", "png", "--only", "devices,summary",
                       "--show", "l1-0.70-s0")
        assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(out)) == ["devices-simple-cnn.png", "summary.md"]
    check_image(out / "devices-simple-cnn.png")
    text = (out / "summary.md").read_text()
    assert "the same checkpoints on each device" in text and doc["machine"]["hostname"] in text
    by_file = {c["file"]: c for c in doc["checkpoints"]}
    line = next(ln for ln in text.splitlines() if ln.startswith("| l1-0.70-s0.safetensors"))
    assert num(line.split("|")[3]) == pytest.approx(1e3 * by_file["l1-0.70-s0.safetensors"]["latency"]["median"], abs=5e-4)
    shown = text.split("### l1-0.70-s0")[1]
    assert "Conv2d(1, " in shown and "Conv2d(1, 16" not in shown  # the pruned widths, not the dense ones


def test_bad_input_gives_one_clean_error_line(tmp_path, study):
    assert_clean_error(run_module("pruneflow.report", tmp_path / "nope"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_module("pruneflow.report", empty), "no results found", "shard-")
    assert_clean_error(run_module("pruneflow.report", study.parent), "no results found", "did you mean")
    text = tmp_path / "text"
    text.mkdir()
    (text / "shard-0-of-1.h5").write_text("not hdf5")
    assert_clean_error(run_module("pruneflow.report", text), "not an HDF5 file")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    with h5py.File(foreign / "shard-0-of-1.h5", "w") as f:
        f["x"] = [1, 2, 3]
    assert_clean_error(run_module("pruneflow.report", foreign), "not a pruneflow results file")
    newer = tmp_path / "newer"
    newer.mkdir()
    with h5py.File(newer / "shard-0-of-1.h5", "w") as f:
        f.attrs["schema"] = 99
        f.create_group("trials")
    assert_clean_error(run_module("pruneflow.report", newer), "newer pruneflow")
    out = ["--out", tmp_path / "o"]
    assert_clean_error(run_module("pruneflow.report", study, *out, "--format", "png,gif"), "gif", "png, pdf")
    assert_clean_error(run_module("pruneflow.report", study, *out, "--show", "l9-0.50-s0"), "l9-0.50-s0", "l1-0.30-s0")
    assert_clean_error(run_module("pruneflow.report", study, *out, "--only", "pie"), "pie", "pareto")


def test_damaged_results_files_name_the_file_trial_and_missing_piece(study, tmp_path):
    """A real shard with one piece deleted or garbled by hand: one line saying where and what, no KeyError."""
    def edit(name, change):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(study / "shard-0-of-1.h5", d / "shard-0-of-1.h5")
        with h5py.File(d / "shard-0-of-1.h5", "r+") as f:
            change(f)
        return d

    def drop_method(f):
        del f["trials/l1-0.30-s0"].attrs["method"]

    def garble_config(f):
        f.attrs["config"] = "{not json"

    def drop_epochs(f):
        del f["trials/dense-s0/epochs"]

    assert_clean_error(run_module("pruneflow.report", edit("method", drop_method)),
                       "shard-0-of-1.h5", "trial l1-0.30-s0", "lacks attribute(s) method")
    assert_clean_error(run_module("pruneflow.report", edit("config", garble_config)),
                       "shard-0-of-1.h5", "config attribute is not valid JSON")
    epochs = edit("epochs", drop_epochs)
    assert_clean_error(run_module("pruneflow.report", epochs),
                       "shard-0-of-1.h5", "trial dense-s0", "lacks table(s) epochs")
    assert not (epochs / "report").exists()  # refused before writing anything


def test_help_documents_every_flag():
    p = run_module("pruneflow.report", "--help")
    text = p.stdout + p.stderr
    for flag in ("STUDY", "--out", "--format", "--show", "--only", "--dpi"):
        assert flag in text, flag


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 80.0), (2.0, 90.0), (3.0, 85.0), (2.5, 90.0), (4.0, 95.0), (0.5, 70.0)]
    assert pareto_front(pts) == [(0.5, 70.0), (1.0, 80.0), (2.0, 90.0), (4.0, 95.0)]


def test_pruned_trials_slower_than_dense_are_noted_by_a_sign_test():
    from pruneflow.study import slower_than_dense

    def rec(tid, slower_pairs, pairs=25, arm="pruned", macs=1.2):
        lat = [2.0 if i < slower_pairs else 0.5 for i in range(pairs)]  # the dense side: 1.0 every time
        return dict(id=tid, arm=arm, status="done", latency=lat, latency_dense=[1.0] * pairs, mac_reduction=macs,
                    speedup=sorted(1.0 / t for t in lat)[pairs // 2])

    notes = slower_than_dense([rec("a", 20), rec("b", 19), rec("c", 25, arm="control"), rec("d", 25, macs=1.0),
                               rec("e", 9, pairs=9), rec("f", 10, pairs=10)])
    # a: 20 of 25 pairs; b: 19 of 25 is under 80 %; c: not pruned; d: no fewer MACs (level); e: too few pairs
    assert notes == ["a ran slower than the dense model in 20 of 25 timed pairs (speedup 0.50x) despite 1.20x fewer MACs",
                     "f ran slower than the dense model in 10 of 10 timed pairs (speedup 0.50x) despite 1.20x fewer MACs"]
    assert slower_than_dense([dict(rec("g", 25), latency_dense=[])]) == []  # files from before paired timing


def test_devices_figure_averages_the_seeds_per_sparsity():
    from pruneflow.figures import _seeds_averaged

    def row(arm, sparsity, mean, median, speedup=None):
        return dict(arm=arm, method="l1" if arm == "pruned" else "none", sparsity=sparsity, mean=mean, std=0.1 * mean,
                    median=median, speedup=speedup)

    paired = _seeds_averaged([row("dense", 0.0, 8.0, 8.0, 1.0), row("dense", 0.0, 12.0, 12.0, 1.0),
                              row("pruned", 0.5, 4.0, 4.0, 2.0), row("pruned", 0.5, 2.0, 2.0, 4.0)])
    assert paired == [dict(sparsity=0.0, mean=10.0, std=pytest.approx(1.0), speedup=1.0),
                      dict(sparsity=0.5, mean=3.0, std=pytest.approx(0.3), speedup=3.0)]  # one point per sparsity
    medians = _seeds_averaged([row("dense", 0.0, 8.0, 8.0), row("dense", 0.0, 12.0, 12.0), row("pruned", 0.5, 5.0, 5.0)])
    assert medians[1]["speedup"] == pytest.approx(2.0)  # no paired speedups: the dense rows' mean median / its median


def test_target_macs_trials_that_missed_their_target_are_noted():
    from pruneflow.study import missed_mac_targets

    def rec(tid, target, reached, sparsity=0.4):
        return dict(id=tid, arm="pruned", status="done", target_mac_reduction=target, mac_reduction=reached,
                    sparsity=sparsity)

    notes = missed_mac_targets([rec("l1-x2.00-s0", 2.0, 2.09), rec("l1-x4.00-s0", 4.0, 4.05),
                                rec("l1-0.50-s0", 0.0, 3.9), rec("l1-x100.00-s0", 100.0, 41.3, sparsity=0.986)])
    # 2.09 is 4.5 % over (SimpleCNN's channel steps); 4.05 within 2 %; a sparsity trial has no target
    assert notes == ["l1-x100.00-s0 reached 41.30x fewer MACs against its 100x target (sparsity 0.986, the closest try)",
                     "l1-x2.00-s0 reached 2.09x fewer MACs against its 2x target (sparsity 0.400, the closest try)"]


def test_missing_trials_are_attributed_to_missing_shards_first():
    from types import SimpleNamespace

    from pruneflow.study import missing_parts

    config = {"seeds": [0], "control": True, "prune": {"methods": ["l1"], "sparsities": [0.3, 0.7]}}
    # 4 trials: shard 0/2 = dense-s0, l1-0.30-s0; shard 1/2 = control-s0, l1-0.70-s0
    killed = SimpleNamespace(files={"shard-0-of-1.h5": {"config": config}}, records=[{"id": "dense-s0"}])
    notes, expected = missing_parts(killed)
    assert expected == ["dense-s0", "control-s0", "l1-0.30-s0", "l1-0.70-s0"]
    assert notes == ["3 expected trial(s) have no record in the shard files present: control-s0, l1-0.30-s0, l1-0.70-s0"]
    half = SimpleNamespace(files={"shard-0-of-2.h5": {"config": config}}, records=[{"id": "dense-s0"}])
    notes, _ = missing_parts(half)
    assert notes == ["shard 1/2 is missing (shard-1-of-2.h5 not found): its trial(s) control-s0, l1-0.70-s0 are absent",
                     "1 expected trial(s) have no record in the shard files present: l1-0.30-s0"]
