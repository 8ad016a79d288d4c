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

SCHEMA = 1
EPOCH_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
PROBE_FIELDS = ("sparsity", "speedup", "lo", "hi")
POINT_FIELDS = ("round", "sparsity", "channel_sparsity", "macs", "params", "epochs")
TRIAL_TABLES = ("epochs", "latency", "widths")  # every trial has them (latency_dense: all but the dense trial)


def _field(doc, default=None, need=None, table=False, factory=None):
    """A TrialRecord field: ``need`` 'all' or 'done' = readers refuse a trial (or a done one) without it;
    ``table``: stored as a dataset of the trial's group, not an attribute."""
    meta = dict(doc=doc, need=need, table=table)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class TrialRecord:
    """One trial's results: the one definition of what /trials/<id> holds (docs/results-schema.md is made from
    it). The trial fills it, the driver adds attempts and packing, the store writes it, readers check it."""

    id: str = _field("dense-s<seed> | control-s<seed> | <method>-<sparsity>-s<seed> | <method>-x<target>-s<seed>")
    arm: str = _field("dense | control | pruned", need="all")
    method: str = _field("none, or a method label: level, l1, l2, fpgm (NNI), l1@depgraph ... slim@depgraph", need="all")
    sparsity: float = _field("nominal fraction removed (pruned arm), else 0", 0.0, need="all")
    seed: int = _field("random seed of fine-tuning, and of the dense training it started from", 0, need="all")
    dense_seed: int = _field("seed of the dense model it started from (-1: unknown; files before 29: seeds[0])", -1)
    status: str = _field("done | failed", "failed", need="all")
    error: str = _field("why it failed (empty when done)", "")
    model: str = _field("model.arch", "")
    dataset: str = _field("data.dataset", "")
    target_mac_reduction: float = _field("MAC reduction asked for (target-MACs mode), else 0", 0.0)
    target_speedup: float = _field("measured speedup asked for (prune.speedup_targets), else 0", 0.0)
    target_speedup_reached: bool = _field("speedup-target mode: the search found a sparsity that reached it", False)
    target_speedup_measured: float = _field("speedup-target mode: the kept probe's paired speedup in the search", 0.0)
    target_speedup_where: str = _field("speedup-target mode: <runtime>-b<batch> the target was measured in", "")
    backend: str = _field("nni | depgraph (pruned arm), else empty", "")
    round_to: int = _field("DepGraph: the channel multiple it was pruned to (prune.round_to); 0 = none", 0)
    attempts: int = _field("runs it took (1 + retries used)", 1)
    trials_per_device: int = _field("K: trials sharing its device while it ran", 1)
    host: str = _field("node it ran on", "")
    pid: int = _field("the Ray worker's process id", 0)
    started_at: float = _field("unix seconds, the worker's clock", 0.0)
    ended_at: float = _field("unix seconds, the worker's clock", 0.0)
    wall_s: float = _field("seconds from start to end", 0.0)
    params: int = _field("parameters after pruning", 0, need="done")
    macs: int = _field("multiply-accumulates per image after pruning", 0, need="done")
    params_dense: int = _field("parameters of the dense model", 0)
    macs_dense: int = _field("MACs of the dense model", 0)
    mac_reduction: float = _field("macs_dense / macs", 1.0, need="done")
    channel_sparsity: float = _field("achieved: fraction of output channels removed from pruned layers", 0.0)
    weight_sparsity: float = _field("achieved: fraction of zero weights in pruned layers", 0.0)
    nonzero_params: int = _field("parameters that are not zero", 0)
    dependency_aware: bool = _field("coupled channels pruned together", False)
    train_acc: float = _field("accuracy on the training split, eval mode", 0.0, need="done")
    val_acc: float = _field("accuracy on the val split (held out of train); files before issue 29: on test",
                            0.0, need="done")
    val_loss: float = _field("loss on the val split", 0.0)
    test_acc: float = _field("accuracy on the data set's test split (absent in files before issue 29)", None)
    test_loss: float = _field("loss on the test split", None)
    split_sha: str = _field("fingerprint of the val carve (infer.data.carve_id): equal in every comparable trial", "")
    precision: str = _field("fp32 | bf16: the arithmetic it trained and was scored in", "")
    compile: str = _field("performance.compile it trained with", "")
    schedule: str = _field("iterative <ramp> x<steps> (prune.schedule); empty: one-shot", "")
    prune_points: list = _field("table: round, sparsity (cumulative, nominal), channel_sparsity (achieved), macs, "
                                "params, epochs after it; attribute widths: each round's (layer, out) as JSON",
                                table=True, factory=list)
    distill_teacher: str = _field("fine-tuned by distillation from this checkpoint (the seed's dense model); empty: "
                                  "plain cross-entropy", "")
    distill_alpha: float = _field("distillation: weight of the cross-entropy term (finetune.distill.alpha)", None)
    distill_temperature: float = _field("distillation: softmax temperature (finetune.distill.temperature)", None)
    latency_mean: float = _field("seconds per timed batch", 0.0, need="done")
    latency_std: float = _field("seconds per timed batch", 0.0, need="done")
    latency_median: float = _field("seconds per timed batch", 0.0, need="done")
    latency_p95: float = _field("seconds per timed batch", 0.0)
    speedup: float = _field("median over timed pairs of latency_dense / latency; 1 for the dense trial", 0.0)
    device: str = _field("torch device it ran on", "")
    device_name: str = _field("its hardware: GPU name or CPU model", "")
    checkpoint: str = _field("its checkpoint, relative to the study directory", "", need="done")
    architecture: str = _field("print(model) after pruning", "")
    seconds_load: float = _field("wall seconds loading the dense checkpoint", 0.0)
    seconds_prune: float = _field("wall seconds pruning", 0.0)
    seconds_speedup: float = _field("the part of seconds_prune in NNI's ModelSpeedup", 0.0)
    seconds_finetune: float = _field("wall seconds fine-tuning", 0.0)
    seconds_evaluate: float = _field("wall seconds scoring the training split", 0.0)
    seconds_time: float = _field("wall seconds timing inference", 0.0)
    seconds_save: float = _field("wall seconds writing the checkpoint", 0.0)
    peak_memory_bytes: int = _field("high-water mark, see peak_memory_kind", 0)
    peak_memory_kind: str = _field("cuda_max_allocated | mps_driver_allocated | cpu_rss", "")
    epochs: list = _field("table: one row per fine-tune epoch (EPOCH_FIELDS)", table=True, factory=list)
    latency: list = _field("table: seconds per timed batch; its attributes are latency_settings", table=True,
                           factory=list)
    latency_settings: dict = _field("attributes of latency: batch_size, warmup, device, threads, channels_last",
                                    table=True, factory=dict)
    latency_dense: list = _field("table: the dense model's seconds, timed alternately with this trial's",
                                 table=True, factory=list)
    widths: list = _field("table: layer, type, in, out of every Conv2d/Linear", table=True, factory=list)
    val_pred: list = _field("table: the class it predicts for each val image, in order (uint8)", table=True,
                            factory=list)
    test_pred: list = _field("table: the class it predicts for each test image, in order (uint8)", table=True,
                             factory=list)
    val_labels: list = _field("the val images' classes: stored once per file, /labels/val", table=True,
                              factory=list)
    test_labels: list = _field("the test images' classes: stored once per file, /labels/test", table=True,
                               factory=list)
    speedup_probes: list = _field("table: sparsity, speedup, lo, hi of every probe a speedup-target search timed",
                                  table=True, factory=list)
    deploy: list = _field("group deploy/<runtime>-b<batch>: one infer.deploy.DeployTiming per latency.runtimes x "
                          "batch_sizes cell; attrs = its fields, datasets latency and latency_dense", table=True,
                          factory=list)
    traceback: str = _field("where it failed (not stored)", "", table=True)

    @classmethod
    def failure(cls, trial, error, **fields):
        """The record of ``trial`` (a spec.Trial) that failed with ``error``."""
        return cls(id=trial.id, arm=trial.arm, method=trial.method, sparsity=trial.sparsity, seed=trial.seed,
                   target_mac_reduction=trial.target, round_to=trial.round_to or 0,
                   target_speedup=trial.speedup_target, status="failed", error=error, **fields)

    def attrs(self):
        """The fields stored as the group's attributes (HDF5 has no None: empty strings). A failed trial stores
        only what it has: results it never measured are absent, not zero."""
        kept = {"error", "attempts", "trials_per_device"}
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["table"] or f.name == "id":
                continue
            if value is None or (self.status != "done" and f.metadata["need"] != "all" and f.name not in kept
                                 and value == f.default):
                continue  # absent, not zero: a reader tells a missing result from a measured 0
            out[f.name] = value
        return out


def required(need):
    """The attribute names readers require of every trial ('all') or of every done one ('done')."""
    return tuple(f.name for f in dataclasses.fields(TrialRecord) if f.metadata["need"] == need)


TRIAL_ATTRS, DONE_ATTRS = required("all"), required("done")


def schema_table():
    """The trial fields as docs/results-schema.md lists them (tests/test_compat.py keeps the two equal)."""
    rows = ["| field | stored as | readers need it of | meaning |", "|---|---|---|---|"]
    for f in dataclasses.fields(TrialRecord):
        if f.name == "traceback":  # printed by the worker, never stored
            continue
        kind = ("the group's name" if f.name == "id" else "attributes of latency" if f.name == "latency_settings"
                else "/labels dataset" if f.name.endswith("_labels") else "group" if f.name == "deploy"
                else "dataset" if f.metadata["table"] else f"attribute ({f.type.__name__})")
        doc = f.metadata["doc"].replace("|", "\\|")
        rows.append(f"| {f.name} | {kind} | {f.metadata['need'] or ''} | {doc} |")
    return "\n".join(rows)


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
