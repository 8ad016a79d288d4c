"""Deployment runtimes (issue 30): ONNX export checked in ONNX Runtime, torch.compile on the CPU, every runtime x
batch timed pair by pair in a sweep, a runtime that fails recorded for itself only, and the report's figures."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import ROOT, assert_clean_error, fault_env, quickstart_study, report_of, run_module
from pruneflow.infer.deploy import time_deployed
from pruneflow.infer.runtimes import RuntimeUnavailable, export_onnx, prepare, providers_for, session
from pruneflow.models import build_model
from pruneflow.results import read_trials


def ort_vs_torch(model, x, tmp_path, dynamic_batch=False):
    path = str(tmp_path / "m.onnx")
    exporter, opset = export_onnx(model, x, path, dynamic_batch)
    sess, provider = session(path, "cpu")
    with torch.inference_mode():
        want = model(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - want).max()), exporter, opset, provider


def test_onnx_export_of_simple_cnn_matches_torch(tmp_path):
    torch.manual_seed(0)
    model = build_model("simple_cnn", in_channels=1).eval()
    diff, exporter, opset, provider = ort_vs_torch(model, torch.randn(4, 1, 28, 28), tmp_path)
    assert diff < 1e-4 and exporter == "dynamo" and opset >= 17 and provider == "CPUExecutionProvider"


def test_onnx_export_of_a_pruned_cifar_resnet18_matches_torch(tmp_path):
    from pruneflow.prune import prune

    torch.manual_seed(0)
    dense = build_model("resnet18", stem="cifar").eval()
    pruned, stats = prune(dense, "l1@depgraph", 0.5, (3, 32, 32), op_types=("Conv2d",), exclude=("fc",),
                          dependency_aware=True, round_to=8)
    assert stats["mac_reduction"] > 2.5  # really smaller, not a masked copy
    x = torch.randn(2, 3, 32, 32)
    diff, *_ = ort_vs_torch(pruned.eval(), x, tmp_path, dynamic_batch=True)
    assert diff < 1e-4
    sess, _ = session(str(tmp_path / "m.onnx"), "cpu")  # the free batch dimension takes another size
    assert sess.run(None, {"x": torch.randn(5, 3, 32, 32).numpy()})[0].shape == (5, 10)


def test_compiled_on_the_cpu_runs_and_keeps_compile_time_apart(monkeypatch):
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)  # compile for real, not from the disk caches
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build_model("simple_cnn", in_channels=1).eval()
    x = torch.randn(8, 1, 28, 28)
    runner = prepare("compiled", model, x)
    assert runner.mode == "default" and runner.provider == "cpu" and runner.prepare_s > 0
    with torch.inference_mode():
        assert torch.allclose(runner.call(), model(x), atol=1e-5)
    (cell,) = time_deployed(model, None, (1, 28, 28), torch.device("cpu"), ["compiled"], [8], warmup=1, trials=3)
    assert cell.status == "done" and len(cell.latency) == 3 and cell.latency_dense == []
    assert cell.prepare_s > max(cell.latency)  # compiling is not in the timed calls


def test_a_runtime_that_cannot_run_is_one_cell_with_its_reason():
    model = build_model("simple_cnn", in_channels=1).eval()
    other = build_model("simple_cnn", in_channels=1).eval()
    with pytest.raises(RuntimeUnavailable, match="no provider for mps"):
        providers_for("mps")  # this onnxruntime has the CPU provider only
    cells = time_deployed(model, other, (1, 28, 28), torch.device("cpu"), ["eager", "compiled"], [2],
                          warmup=1, trials=3, compile_mode="no-such-mode")
    assert [c.status for c in cells] == ["done", "failed"] and "unknown compile mode" in cells[1].error
    assert cells[0].speedup_lo <= cells[0].speedup <= cells[0].speedup_hi and len(cells[0].latency_dense) == 3


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, dense_ckpt):
    """dense + l1 at 0.5, timed in all three runtimes at batch 1 and 8; l1's ONNX export is made to fail."""
    out = tmp_path_factory.mktemp("deploy")
    env = fault_env(fail_export=["l1-0.50-s0"])
    p = run_module("pruneflow.sweep", "jobs/quickstart.yaml", "--out", out, "--seeds", "[0]", "--dense", dense_ckpt,
                   "--prune.methods", "[l1]", "--prune.sparsities", "[0.5]", "--nocontrol", "--finetune.epochs", 1,
                   "--latency.trials", 3, "--latency.warmup", 1, "--noprogress",
                   "--latency.runtimes", "[eager, compiled, onnxruntime]", "--latency.batch_sizes", "[1, 8]", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return out / "quickstart"


def test_sweep_times_every_runtime_and_batch_and_isolates_a_failed_export(deployed):
    trials = {r["id"]: r for r in read_trials(deployed / "shard-0-of-1.h5")}
    assert {t["status"] for t in trials.values()} == {"done"}  # the failed export failed no trial
    cells = {c.key: c for c in trials["l1-0.50-s0"]["deploy"]}
    assert sorted(cells) == ["compiled-b1", "compiled-b8", "eager-b1", "eager-b8", "onnxruntime-b1", "onnxruntime-b8"]
    for key in ("onnxruntime-b1", "onnxruntime-b8"):
        assert cells[key].status == "failed" and "injected export failure for l1-0.50-s0" in cells[key].error
    for key in ("compiled-b1", "compiled-b8", "eager-b1", "eager-b8"):
        c = cells[key]
        assert c.status == "done" and len(c.latency) == len(c.latency_dense) == 3 and c.speedup_lo <= c.speedup_hi
    assert cells["compiled-b8"].mode == "default" and cells["compiled-b8"].prepare_s > 0
    dense = {c.key: c for c in trials["dense-s0"]["deploy"]}
    assert dense["onnxruntime-b8"].status == "done" and dense["onnxruntime-b8"].provider == "CPUExecutionProvider"
    assert dense["onnxruntime-b8"].opset >= 17 and dense["onnxruntime-b8"].latency_dense == []
    h5 = subprocess.run(["h5ls", "-r", str(deployed / "shard-0-of-1.h5")], capture_output=True, text=True).stdout
    assert "/trials/l1-0.50-s0/deploy/onnxruntime-b8/latency" in h5  # real HDF5, read by another tool


def test_report_draws_the_runtime_figures_and_tables(deployed):
    p, rep = report_of(deployed, "--format", "png")
    assert (rep / "deploy-speedup-simple-cnn.png").stat().st_size > 10_000
    assert (rep / "deploy-throughput-simple-cnn.png").stat().st_size > 10_000
    text = (rep / "summary.md").read_text()
    assert "## Deployment runtimes" in text and "| simple_cnn | l1 | 0.50 | compiled | 8 | 1 |" in text
    assert "onnxruntime, batch 8: l1-0.50-s0: ONNX export failed" in text


def test_export_cli_writes_checked_onnx_beside_each_checkpoint(deployed, tmp_path):
    ckpts = deployed / "checkpoints"
    p = run_module("pruneflow.export", "--ckpt", ckpts, "--dynamic-batch", "--batch", 2)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("max |diff|") == 2 and "digits test images" in p.stdout
    m = onnx.load(str(ckpts / "l1-0.50-s0.onnx"))
    props = {e.key: e.value for e in m.metadata_props}
    assert float(props["pruneflow.max_abs_diff"]) < 1e-4 and json.loads(props["pruneflow.meta"])["method"] == "l1"
    pickle = tmp_path / "model.pt"
    torch.save(build_model("simple_cnn", in_channels=1), pickle)
    for args, needle in ((["--ckpt", pickle], "not a .safetensors checkpoint"),
                         (["--ckpt", ckpts, "--batch", 0], "--batch must be a whole number >= 1"),
                         (["--ckpt", ckpts, "--format", "tensorrt"], "unknown format 'tensorrt'"),
                         (["--ckpt", ckpts, "--atol", -1], "--atol must be a number > 0"),
                         (["--ckpt", ckpts, "--out", tmp_path / "x.onnx"], "--out names one file"),
                         (["--ckpt", tmp_path / "absent.safetensors"], "no such checkpoint")):
        assert_clean_error(run_module("pruneflow.export", *args), needle)


def test_infer_times_runtimes_and_batches_into_its_json(deployed, tmp_path):
    out = tmp_path / "dev.json"
    p = run_module("pruneflow.infer", "--ckpt", deployed / "checkpoints", "--device", "cpu", "--runtime",
                   "eager,onnxruntime", "--batch-sizes", "1,4", "--trials", 3, "--warmup", 1, "--out", out)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    row = next(r for r in doc["checkpoints"] if r["arm"] == "pruned")
    assert sorted((c["runtime"], c["batch_size"]) for c in row["deploy"]) == [
        ("eager", 1), ("eager", 4), ("onnxruntime", 1), ("onnxruntime", 4)]
    assert all(c["status"] == "done" and len(c["latency_dense"]) == 3 for c in row["deploy"])
    assert doc["settings"]["runtimes"] == ["eager", "onnxruntime"]
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(doc, json.load(open(os.path.join(ROOT, "docs", "device-json.schema.json"))))


@pytest.mark.parametrize("args, needle", [
    (["--runtime", "tensorrt"], "unknown runtime 'tensorrt'"),
    (["--runtime", "onnxruntime", "--dtype", "bfloat16"], "runs float32 ONNX exports"),
    (["--batch-sizes", "1,0"], "each of --batch-sizes must be a whole number >= 1"),
    (["--batch-sizes", "1,x"], "each of --batch-sizes must be a whole number >= 1"),
    (["--runtime", "compiled", "--compile-mode", "fast"], "unknown compile mode 'fast'"),
])
def test_infer_refuses_bad_runtime_flags(dense_ckpt, args, needle):
    assert_clean_error(run_module("pruneflow.infer", "--ckpt", dense_ckpt, "--device", "cpu", *args), needle)


@pytest.mark.parametrize("args, needle", [
    (["pruneflow.infer", "--ckpt", "CKPT", "--runtime", "onnxruntime"], "--runtime onnxruntime needs onnxruntime"),
    (["pruneflow.sweep", "jobs/quickstart.yaml", "--out", "OUT", "--latency.runtimes", "[onnxruntime]"],
     "latency.runtimes: onnxruntime needs onnxruntime"),
    (["pruneflow.export", "--ckpt", "CKPT"], "onnxruntime is not installed (pip install 'pruneflow[onnx]')"),
])
def test_without_onnxruntime_the_runtime_names_the_extra(dense_ckpt, tmp_path, args, needle):
    code = ("import runpy, sys\n"
            "sys.modules['onnxruntime'] = None  # as if not installed\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")
    args = [dense_ckpt if a == "CKPT" else str(tmp_path) if a == "OUT" else a for a in args]
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert_clean_error(p, needle)
    assert "pruneflow[onnx]" in p.stderr and not (tmp_path / "quickstart").exists()


def test_a_study_from_before_the_runtimes_resumes_with_their_defaults(tmp_path):
    from pruneflow.errors import UserError
    from pruneflow.results import ResultStore
    from pruneflow.spec import config_of, load_spec, resolve
    from pruneflow.sweep.driver import check_same_settings

    spec, text = load_spec("jobs/quickstart.yaml")
    config = config_of(resolve(spec))
    older = json.loads(json.dumps(config))  # as a file written before latency.runtimes existed holds it
    for k in ("runtimes", "batch_sizes", "compile_mode", "target_runtime", "target_batch"):
        del older["latency"][k]
    path = tmp_path / "shard-0-of-1.h5"
    ResultStore(path, "quickstart", text, older).close()
    check_same_settings(str(path), config)  # eager at batch_size is what it ran: no change
    spec, _ = load_spec("jobs/quickstart.yaml", {"latency.runtimes": ["eager", "compiled"]})
    with pytest.raises(UserError, match=r"latency.runtimes \['eager'\] -> \['eager', 'compiled'\]"):
        check_same_settings(str(path), config_of(resolve(spec)))
