"""The HDF5 result store: one file per shard, one writer (the sweep's driver), crash-safe and resumable.

Layout (schema 1; docs/results-schema.md is the reference):

    /                    attrs: schema, pruneflow_version, study, shard, job (job file text), config (JSON), host, created
    /env                 attrs: python, torch, nni, ray, h5py versions, device, device_name, cuda, cpu
    /trials/<id>         attrs: arm (dense|control|pruned), method, sparsity, seed, status (done|failed), error, ...
    /trials/<id>/epochs  compound table: epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds
    /trials/<id>/val_pred, test_pred  uint8: the class predicted for each image of the val / test split, in order
    /labels/val, /labels/test  uint8: those images' true classes, once per file; attrs: split_sha (the carve)
    /trials/<id>/latency seconds per timed batch (raw samples); attrs: batch_size, device, warmup
    /trials/<id>/latency_dense the dense model's seconds, timed alternately with the trial's (absent for dense)
    /trials/<id>/widths  compound table: layer, type, in, out (after pruning)
    /trials/<id>/speedup_probes  compound table: sparsity, speedup, lo, hi (speedup-target trials)
    /trials/<id>/deploy/<runtime>-b<batch>  attrs: runtime, batch_size, status, provider, speedup [lo, hi], ...;
                         datasets latency, latency_dense: one cell per latency.runtimes x batch_sizes
    /utilisation/run-<k> one group per sweep run: float64 columns time (unix s), cpu_percent, memory_used_bytes,
                         gpu<i>_util_percent, gpu<i>_memory_used_bytes; attrs interval_s, host, gpus, ...

Crash safety: each trial is added by copying the file, appending to the copy and ``os.replace``-ing it over
the original. A ``kill -9`` at any moment leaves either the old or the new complete file, never a torn one.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import socket

from .errors import UserError
from .files import atomic
from .record import DONE_ATTRS, TRIAL_ATTRS, TrialRecord

SCHEMA = 1
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
PROBE_FIELDS = ("sparsity", "speedup", "lo", "hi")
POINT_FIELDS = ("round", "sparsity", "channel_sparsity", "macs", "params", "epochs")
TRIAL_TABLES = ("epochs", "latency", "widths")  # every trial has them (latency_dense: all but the dense trial)


def _h5py():
    import h5py

    return h5py


class ResultStore:
    """Append-only store of one shard's trials. Holds an exclusive lock while open (one writer per file)."""

    def __init__(self, path, study, job_text="", config=None, shard="0/1", env=None):
        self.path = os.fspath(path)
        self._lock_file = open(self.path + ".lock", "a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise UserError(f"another sweep is writing {self.path} (lock held); wait for it or use another --out") from None
        tmp = self.path + ".tmp"
        if os.path.exists(tmp):  # left by a kill between copy and rename: the original is intact
            os.remove(tmp)
        if os.path.exists(self.path):
            check_file(self.path)
        else:
            h5py = _h5py()
            with atomic(self.path, tmp) as tmp, h5py.File(tmp, "w") as f:
                f.attrs.update(schema=SCHEMA, pruneflow_version=_version(), study=study, shard=shard, job=job_text,
                               config=json.dumps(config or {}, sort_keys=True), host=socket.gethostname(),
                               created=_now())
                f.create_group("env").attrs.update({k: str(v) for k, v in (env or {}).items()})
                f.create_group("trials")

    def close(self):
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def done_ids(self):
        return {t["id"] for t in read_trials(self.path) if t["status"] == "done"}

    @contextlib.contextmanager
    def _edit(self):
        """An h5py.File on a copy of the store, which replaces the original only when the block succeeds (a full
        disk leaves the original as it was: complete up to its last stored trial)."""
        with atomic(self.path, self.path + ".tmp") as tmp:
            shutil.copyfile(self.path, tmp)
            with _h5py().File(tmp, "a") as f:
                yield f

    def update_settings(self, job_text, config):
        """Record the job file and resolved settings of this run when they differ from the stored ones (a
        re-run that grew the grid; the sweep refuses changes that would make the results incomparable)."""
        with _h5py().File(self.path, "r") as f:
            same = f.attrs.get("job") == job_text and json.loads(f.attrs.get("config") or "{}") == config
        if not same:
            with self._edit() as f:
                f.attrs.update(job=job_text, config=json.dumps(config or {}, sort_keys=True), updated=_now())

    def add_utilisation(self, series, attrs):
        """Store one sweep run's utilisation samples (pruneflow.monitor) as /utilisation/run-<k>."""
        import numpy as np

        if not series.get("time"):
            return
        with self._edit() as f:
            runs = f.require_group("utilisation")
            g = runs.create_group(f"run-{len(runs)}")
            g.attrs.update({k: v for k, v in attrs.items() if v is not None})
            for column, values in series.items():
                g.create_dataset(column, data=np.asarray(values, dtype="f8"))

    def add(self, record):
        """Write one TrialRecord (replacing an earlier failed record of the same id) atomically."""
        h5py = _h5py()
        import numpy as np

        with self._edit() as f:
            trials = f["trials"]
            if record.id in trials:
                del trials[record.id]
            g = trials.create_group(record.id)
            g.attrs.update(record.attrs())
            table = np.array([tuple(float(e[k]) for k in EPOCH_FIELDS) for e in record.epochs],
                             dtype=[(k, "f8") for k in EPOCH_FIELDS])
            g.create_dataset("epochs", data=table)
            lat = g.create_dataset("latency", data=np.asarray(record.latency, dtype="f8"))
            lat.attrs.update(record.latency_settings)
            if record.latency_dense:  # the dense model's samples, timed pair by pair with this trial's
                g.create_dataset("latency_dense", data=np.asarray(record.latency_dense, dtype="f8"))
            wt = np.array([(n, t, i, o) for n, t, i, o in record.widths],
                          dtype=[("layer", h5py.string_dtype()), ("type", h5py.string_dtype()), ("in", "i8"), ("out", "i8")])
            g.create_dataset("widths", data=wt)
            if record.prune_points:
                pts = g.create_dataset("prune_points", data=np.array(
                    [tuple(pt[k] for k in POINT_FIELDS) for pt in record.prune_points],
                    dtype=[("round", "i8"), ("sparsity", "f8"), ("channel_sparsity", "f8"), ("macs", "i8"),
                           ("params", "i8"), ("epochs", "i8")]))
                pts.attrs["widths"] = json.dumps([pt["widths"] for pt in record.prune_points])
            if record.speedup_probes:
                g.create_dataset("speedup_probes", data=np.array([tuple(map(float, p)) for p in record.speedup_probes],
                                                                 dtype=[(k, "f8") for k in PROBE_FIELDS]))
            if record.deploy:
                cells = g.create_group("deploy")
                for cell in record.deploy:
                    c = cells.create_group(cell.key)
                    c.attrs.update(cell.attrs())
                    c.create_dataset("latency", data=np.asarray(cell.latency, dtype="f8"))
                    c.create_dataset("latency_dense", data=np.asarray(cell.latency_dense, dtype="f8"))
            for split in ("val", "test"):
                pred = getattr(record, f"{split}_pred")
                if len(pred):
                    g.create_dataset(f"{split}_pred", data=np.asarray(pred, dtype="u1"))
                    _add_labels(f, split, np.asarray(getattr(record, f"{split}_labels"), dtype="u1"),
                                record.split_sha, record.id)


def _add_labels(f, split, labels, sha, trial_id):
    """/labels/<split> once per file; a trial scored on other images (another carve, other data) is refused."""
    import numpy as np

    group = f.require_group("labels")
    if split not in group:
        group.create_dataset(split, data=labels).attrs["split_sha"] = sha
        return
    have = group[split]
    if _plain(have.attrs.get("split_sha", "")) != sha or not np.array_equal(have[()], labels):
        raise UserError(f"trial {trial_id} was scored on other {split} images than this file's other trials "
                        f"(carve {sha or '?'} against {_plain(have.attrs.get('split_sha', ''))}); not stored")


def _now():
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _version():
    from . import __version__

    return __version__


def check_file(path):
    """Open ``path`` read-only and check it is a pruneflow results file this version can read."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not an HDF5 file (or it is corrupt)") from None
    with f:
        if "schema" not in f.attrs or "trials" not in f:
            raise UserError(f"{path} is HDF5 but not a pruneflow results file")
        schema = int(f.attrs["schema"])
        if schema > SCHEMA:
            raise UserError(f"{path} was written by a newer pruneflow (results schema {schema}; this version reads "
                            f"up to {SCHEMA}): upgrade pruneflow to read it")


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def read_file_attrs(path):
    check_file(path)
    with _h5py().File(path, "r") as f:
        out = {k: _plain(v) for k, v in f.attrs.items()}
        out["env"] = {k: _plain(v) for k, v in f["env"].attrs.items()} if "env" in f else {}
    try:
        out["config"] = json.loads(out.get("config") or "{}")
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: its config attribute is not valid JSON ({e})") from None
    if not isinstance(out["config"], dict):
        raise UserError(f"{path}: its config attribute is not a JSON object")
    return out


def read_trials(path):
    """Every trial record in one file as a dict (attrs + 'epochs' list, 'latency' list, 'widths' list)."""
    check_file(path)
    with _h5py().File(path, "r") as f:
        labels = {k: v[()] for k, v in f["labels"].items()} if "labels" in f else {}
        return [_read_trial(path, tid, g, labels) for tid, g in f["trials"].items()]


def _read_trial(path, tid, g, labels):
    where = f"{path}: trial {tid}"
    missing = [k for k in TRIAL_ATTRS if k not in g.attrs]
    if not missing and _plain(g.attrs["status"]) == "done":
        missing = [k for k in DONE_ATTRS if k not in g.attrs]
    if missing:
        raise UserError(f"{where} lacks attribute(s) {', '.join(missing)} (the file was damaged or edited)")
    tables = [k for k in TRIAL_TABLES if k not in g]
    if tables:
        raise UserError(f"{where} lacks table(s) {', '.join(tables)} (the file was damaged or edited)")
    try:
        r = {k: _plain(v) for k, v in g.attrs.items()}
        r["id"] = tid
        r["epochs"] = [{k: float(row[k]) for k in EPOCH_FIELDS} for row in g["epochs"][()]]
        r["latency"] = [float(x) for x in g["latency"][()]]
        r["latency_settings"] = {k: _plain(v) for k, v in g["latency"].attrs.items()}
        r["latency_dense"] = [float(x) for x in g["latency_dense"][()]] if "latency_dense" in g else []
        r["widths"] = [(_plain(a), _plain(b), int(c), int(d)) for a, b, c, d in g["widths"][()]]
        for split in ("val", "test"):  # absent in files before issue 29: no per-image tests for those trials
            r[f"{split}_pred"] = g[f"{split}_pred"][()] if f"{split}_pred" in g else None
            r[f"{split}_labels"] = labels.get(split) if r[f"{split}_pred"] is not None else None
        r["deploy"] = _read_deploy(g["deploy"]) if "deploy" in g else []  # absent before issue 30
        if "prune_points" in g:  # iterative trials (issue 31)
            widths = json.loads(_plain(g["prune_points"].attrs.get("widths", "[]")))
            r["prune_points"] = [dict({k: row[k].item() for k in POINT_FIELDS}, widths=[tuple(w) for w in ws])
                                 for row, ws in zip(g["prune_points"][()], widths)]
        r["speedup_probes"] = ([tuple(float(row[k]) for k in PROBE_FIELDS) for row in g["speedup_probes"][()]]
                               if "speedup_probes" in g else [])
    except (KeyError, ValueError, TypeError, OSError) as e:  # a table of the wrong shape or type, unreadable data
        raise UserError(f"{where} could not be read ({type(e).__name__}: {e})") from None
    r["file"] = os.path.basename(path)
    return r


def _read_deploy(group):
    from .infer.deploy import DeployTiming

    names = {f.name for f in dataclasses.fields(DeployTiming)}
    cells = []
    for c in group.values():
        kw = {k: _plain(v) for k, v in c.attrs.items() if k in names}
        kw.update(latency=[float(x) for x in c["latency"][()]], latency_dense=[float(x) for x in c["latency_dense"][()]])
        cells.append(DeployTiming(**kw))
    return sorted(cells, key=lambda c: (c.runtime, c.batch_size))


def read_records(path):
    """Every trial in one file as a TrialRecord (fields absent in older files take their defaults)."""
    names = {f.name for f in dataclasses.fields(TrialRecord)}
    return [TrialRecord(**{k: v for k, v in r.items() if k in names and v is not None}) for r in read_trials(path)]


def read_utilisation(path):
    """The utilisation runs of one file: [{'name', 'attrs', 'series': {column: numpy array}}], oldest first."""
    check_file(path)
    runs = []
    with _h5py().File(path, "r") as f:
        if "utilisation" not in f:
            return runs
        for name in sorted(f["utilisation"], key=lambda n: int(n.split("-")[-1])):
            g = f["utilisation"][name]
            runs.append(dict(name=name, attrs={k: _plain(v) for k, v in g.attrs.items()},
                             series={k: g[k][()] for k in g}))
    return runs


def study_files(study_dir):
    return sorted(os.path.join(study_dir, f) for f in os.listdir(study_dir)
                  if f.startswith("shard-") and f.endswith(".h5"))


def read_study(study_dir):
    """All trials of a study, merged over its shard files (a done record wins over a failed one)."""
    best = {}
    for path in study_files(study_dir):
        for r in read_trials(path):
            if r["id"] not in best or (r["status"] == "done" and best[r["id"]]["status"] != "done"):
                best[r["id"]] = r
    return list(best.values())
