"""TrialRecord: what one trial of a study is, field by field, with each field's meaning and whether readers need
it. The one definition the trial fills, the store writes (pruneflow.results) and docs/results-schema.md lists.
"""

import dataclasses


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
    status: str = _field("done | failed (a trial's disk_full stops the sweep and is never stored)", "failed",
                         need="all")
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
