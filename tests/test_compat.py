"""Files written before a change keep working after it: a results file and a checkpoint from before issue 28
(tests/data/before-issue-28/README.md), and the results schema's documentation against TrialRecord."""
import os
import shutil

from conftest import ROOT, report_of, run_module
from pruneflow.record import TrialRecord, schema_table
from pruneflow.results import read_records

OLD = os.path.join(ROOT, "tests", "data", "before-issue-28")


def test_a_results_file_from_before_opens_in_the_report(tmp_path):
    study = tmp_path / "quickstart"
    study.mkdir()
    shutil.copy(os.path.join(OLD, "shard-0-of-1.h5"), study)
    p, report = report_of(study)
    summary = (report / "summary.md").read_text()
    assert "l1" in summary
    # no per-image predictions then, and val was test: absent results say so, never 0
    assert "no intervals or tests" in summary and "| — |" in summary
    records = {r.id: r for r in read_records(study / "shard-0-of-1.h5")}
    assert sorted(records) == ["control-s0", "dense-s0", "l1-0.50-s0"]
    assert all(r.status == "done" for r in records.values()) and records["l1-0.50-s0"].mac_reduction > 3
    assert records["l1-0.50-s0"].latency_settings["keep_freed_memory"]  # written then, read back as it was


def test_a_checkpoint_from_before_runs_in_infer():
    p = run_module("pruneflow.infer", os.path.join(OLD, "l1-0.50-s0.safetensors"), "--device", "cpu",
                   "--trials", 2, "--warmup", 1)
    assert p.returncode == 0, p.stdout + p.stderr
    # the same weights on the same digits test split: the accuracy the sweep recorded when it was written
    assert "test accuracy: 91.09 %" in p.stdout, p.stdout


def test_the_schema_doc_lists_every_trial_field():
    # docs/results-schema.md carries schema_table()'s output: a field added to TrialRecord must be documented
    doc = open(os.path.join(ROOT, "docs", "results-schema.md")).read()
    assert schema_table() in doc, "regenerate: python -c 'from pruneflow.record import schema_table; print(schema_table())'"


def test_a_trial_record_round_trips_through_the_store(tmp_path):
    from pruneflow.results import ResultStore

    record = TrialRecord(id="l1-0.50-s0", arm="pruned", method="l1", sparsity=0.5, seed=0, status="done",
                         params=10, macs=20, mac_reduction=2.0, checkpoint="checkpoints/x.safetensors",
                         epochs=[dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=1.1, val_acc=0.4, lr=0.01,
                                      seconds=2.0)], latency=[0.1, 0.2], latency_dense=[0.2, 0.4],
                         latency_settings=dict(batch_size=2, threads=1), widths=[("conv1", "Conv2d", 1, 8)])
    with ResultStore(tmp_path / "s.h5", "study") as store:
        store.add(record)
    (back,) = read_records(tmp_path / "s.h5")
    assert back == record


def test_a_failed_trial_stores_only_what_it_has(tmp_path):
    from pruneflow.results import ResultStore, read_trials
    from pruneflow.spec import Trial

    record = TrialRecord.failure(Trial("pruned", "l1", 0.5, 0), "worker died: OOM", attempts=2)
    with ResultStore(tmp_path / "s.h5", "study") as store:
        store.add(record)
    (raw,) = read_trials(tmp_path / "s.h5")
    assert raw["status"] == "failed" and raw["attempts"] == 2 and raw["error"] == "worker died: OOM"
    assert "params" not in raw and "val_acc" not in raw and "seconds_prune" not in raw  # never measured
    assert read_records(tmp_path / "s.h5") == [record]
