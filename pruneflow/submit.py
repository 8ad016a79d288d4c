"""The whole study as Slurm jobs, with submitit: dense training -> an array of sweep shards -> a report.

``python -m pruneflow.submit jobs/resnet101_cifar10.yaml --partition a100 --nodes 4 --gpus-per-node 1``

Cluster glue only: each job calls the very function its CLI calls (``run_sweep``, the report), with the same
job file and overrides, so there is no second copy of the study's parameters. Jobs are Checkpointable: on
Slurm's timeout/preemption signal submitit requeues them, and they resume from what is on disk (dense
training from its per-epoch state, a shard from its HDF5 file, finished trials skipped).
"""

import contextlib
import os
import re
import shlex
import shutil
import subprocess
import sys

try:
    import submitit

    Checkpointable = submitit.helpers.Checkpointable
except ModuleNotFoundError as e:  # cli() says so in one line (require); nothing below runs without it
    if e.name != "submitit":  # submitit there but broken (one of its own dependencies): its own error
        raise
    submitit, Checkpointable = None, object

from .errors import UserError, check_flag, check_whole, require


def _finished(result):
    """The work is on disk: a timeout signal arriving now (Slurm signals on a coarse clock) must not turn a
    finished job into a FAILED one, nor requeue it. Ignore it for the rest of this process."""
    from .cluster import install_stop_handlers

    install_stop_handlers("finished")
    return result


class TrainStep(Checkpointable):
    """Train the study's dense model (resumes from OUT/<study>/dense.safetensors.resume.pt on requeue)."""

    def __init__(self, job, out, overrides):
        self.job, self.out, self.overrides = job, out, overrides

    def __call__(self):
        from .sweep import run_sweep

        return _finished(run_sweep(self.job, out=self.out, progress=False, train_only=True, **self.overrides))


class SweepShard(Checkpointable):
    """One node's shard (resumes from its HDF5 file on requeue: finished trials are skipped)."""

    def __init__(self, job, shard, out, overrides):
        self.job, self.shard, self.out, self.overrides = job, shard, out, overrides

    def __call__(self):
        from .sweep import run_sweep

        return _finished(run_sweep(self.job, shard=self.shard, out=self.out, progress=False, **self.overrides))


class ReportStep(Checkpointable):
    """Figures and summary.md from whatever the shards left (runs after them, even if some failed)."""

    def __init__(self, study_dir):
        self.study_dir = study_dir

    def __call__(self):
        from . import report

        return _finished(report.cli(self.study_dir))


def parse_time(value):
    """Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes (at least 1)."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise UserError(f"--time {value!r} is not a Slurm time (e.g. 30, 04:00:00, 1-12:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + int(c or 0) / 60
    elif c is not None:  # H:M:S
        minutes = int(a) * 60 + int(b) + int(c) / 60
    elif b is not None:  # M:S
        minutes = int(a) + int(b) / 60
    else:  # M
        minutes = int(a)
    if minutes <= 0:
        raise UserError(f"--time {value!r} must be positive")
    return max(1, round(minutes))


def slurm_partitions():
    """Partitions Slurm knows, from sinfo ('debug*' marks the default)."""
    p = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise UserError(f"sinfo failed: {p.stderr.strip() or p.returncode} (is Slurm up?)")
    return [x.strip().rstrip("*") for x in p.stdout.split() if x.strip()]


def python_command(container):
    """The interpreter submitit starts on the node: plain python, or python inside the Apptainer image."""
    if not container:
        return None  # submitit's default: the python running this command
    if not os.path.exists(container):
        raise UserError(f"container image {container} does not exist (build it with containers/build.sh)")
    return f"apptainer exec --nv {shlex.quote(os.path.abspath(container))} python"


def submit(job, partition=None, nodes=1, gpus_per_node=0, cpus_per_task=None, mem=None, time="04:00:00",
           account=None, qos=None, container=None, cluster="slurm", out="results", signal_delay_s=90,
           dry_run=False, report_partition=None, **overrides):
    """Submit (or print) the pipeline. Returns a dict of job ids (empty for a dry run)."""
    from .spec import load_spec

    dry_run = check_flag(dry_run, "dry_run")  # Fire gives --dry-run false as the string 'false'
    if cluster not in ("slurm", "local"):
        raise UserError(f"--cluster must be slurm or local, got {cluster!r}")
    for name, v, least in (("nodes", nodes, 1), ("gpus-per-node", gpus_per_node, 0),
                           ("cpus-per-task", cpus_per_task or 1, 1), ("signal-delay-s", signal_delay_s, 1)):
        check_whole(v, f"--{name}", least)
    # Slurm's --mem: a whole number with an optional unit K, M, G or T (MB without one)
    if mem is not None and not re.fullmatch(r"[1-9][0-9]*[KMGT]?", str(mem).upper()):
        raise UserError(f"--mem must be a size such as 64G, 8000M or 8000 (MB), got {mem!r}")
    minutes = parse_time(time)
    if signal_delay_s >= minutes * 60:
        raise UserError(f"--signal-delay-s {signal_delay_s} must be shorter than the time limit ({minutes} min)")
    spec, _ = load_spec(job, overrides)  # the sweep's own validation, before anything is queued
    study_dir = os.path.abspath(os.path.join(out, spec.study))
    job, out = os.path.abspath(job), os.path.abspath(out)
    python = python_command(container)
    if cluster == "slurm" and not dry_run:
        if shutil.which("sbatch") is None:
            raise UserError("Slurm not found (no sbatch on PATH); run the same pipeline on this machine with --cluster local")
    named = [(flag, p) for flag, p in (("--partition", partition), ("--report-partition", report_partition)) if p]
    if cluster == "slurm" and named and shutil.which("sinfo"):
        try:
            known = slurm_partitions()
        except UserError as e:
            if not dry_run:
                raise
            known = None  # a dry run prints the scripts anyway (e.g. prepared while the controller is down)
            print(f"warning: partition {', '.join(p for _, p in named)!r} not checked: {e}", file=sys.stderr)
        for flag, p in named:
            if known is not None and p not in known:
                raise UserError(f"unknown partition {p!r} ({flag}); this cluster has: {', '.join(known)}")
    folder = os.path.join(study_dir, "slurm", "%j")
    params = dict(partition=partition, time=minutes, nodes=1, ntasks_per_node=1, cpus_per_task=cpus_per_task,
                  gpus_per_node=gpus_per_node or None, mem=mem, account=account, qos=qos,
                  signal_delay_s=int(signal_delay_s), report_partition=report_partition)
    params = {k: v for k, v in params.items() if v is not None}
    steps = [("train", f"pf-train-{spec.study}", None), ("sweep", f"pf-sweep-{spec.study}", "afterok:<train job>"),
             ("report", f"pf-report-{spec.study}", "afterany:<sweep array>")]
    if dry_run:
        return print_dry_run(folder, python, params, steps, nodes, spec.study)
    if cluster == "local":
        return run_local(folder, job, out, overrides, nodes, study_dir, minutes)
    ids = {}
    train_ex = slurm_executor(folder, python, step_params(params, "train"), steps[0][1])
    ids["train"] = train_ex.submit(TrainStep(job, out, overrides)).job_id
    sweep_ex = slurm_executor(folder, python, step_params(params, "sweep"), steps[1][1],
                              dependency=f"afterok:{ids['train']}", array_parallelism=nodes)
    with sweep_ex.batch():
        shards = [sweep_ex.submit(SweepShard(job, f"{i}/{nodes}", out, overrides)) for i in range(nodes)]
    ids["sweep"] = shards[0].job_id.split("_")[0]
    report_ex = slurm_executor(folder, python, step_params(params, "report"), steps[2][1],
                               dependency=f"afterany:{ids['sweep']}")
    ids["report"] = report_ex.submit(ReportStep(study_dir)).job_id
    logs = os.path.join(study_dir, "slurm")
    if not os.path.relpath(logs).startswith(".."):
        logs = os.path.relpath(logs)
    print(f"submitted study {spec.study}: train {ids['train']} -> sweep array {ids['sweep']} "
          f"({nodes} shard(s)) -> report {ids['report']}")
    print(f"logs: {logs}/<job id>/<job id>_0_log.out (e.g. {logs}/{ids['sweep']}_0/{ids['sweep']}_0_0_log.out)")
    print(f"follow: squeue -j {ids['train']},{ids['sweep']},{ids['report']}   |   "
          f"sacct -j {ids['train']},{ids['sweep']},{ids['report']} -X")
    return ids


# The report job reads the shards' HDF5 files and draws figures: no GPU, one process, minutes. Asking for a
# shard's CPUs, memory and time would keep it queued behind the shards' kind of node for nothing.
REPORT_LIMITS = dict(cpus_per_task=2, time=30, mem_mb=8192)


def mem_mb(mem):
    """Slurm's --mem (a whole number, unit K, M, G or T, MB without one) in MB."""
    text = str(mem).upper()
    scale = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 ** 2}.get(text[-1])
    return int(text) if scale is None else int(text[:-1]) * scale


def step_params(params, step):
    """One job's resources from the shards' (``params``): the dense training takes at most one GPU (it trains one
    model on one GPU; more would sit idle through the whole training, and every requeue); the report no GPU, at
    most REPORT_LIMITS' CPUs, minutes and memory, on ``report_partition`` where one is given."""
    params = dict(params)
    report_partition = params.pop("report_partition", None)
    if step == "report":
        params.pop("gpus_per_node", None)
        if report_partition:
            params["partition"] = report_partition
        params["time"] = min(params["time"], REPORT_LIMITS["time"])
        params["cpus_per_task"] = min(params.get("cpus_per_task", 1), REPORT_LIMITS["cpus_per_task"])
        if "mem" in params and mem_mb(params["mem"]) > REPORT_LIMITS["mem_mb"]:
            params["mem"] = f"{REPORT_LIMITS['mem_mb']}M"
        # Slurm's warning comes signal_delay_s before the end: keep it inside a shortened limit
        params["signal_delay_s"] = min(params["signal_delay_s"], params["time"] * 60 // 2)
    if step == "train" and params.get("gpus_per_node"):
        params["gpus_per_node"] = min(params["gpus_per_node"], 1)
    return params


def slurm_executor(folder, python, params, name, dependency=None, array_parallelism=None):
    ex = submitit.SlurmExecutor(folder=folder, python=python, max_num_timeout=20)
    extra = dict(params, job_name=name)
    if dependency:
        extra["dependency"] = dependency
    if array_parallelism:
        extra["array_parallelism"] = array_parallelism
    ex.update_parameters(**extra)
    return ex


def print_dry_run(folder, python, params, steps, nodes, study):
    from submitit.slurm.slurm import _make_sbatch_string

    for step, name, dependency in steps:
        p = dict(step_params(params, step), job_name=name)
        if dependency:
            p["dependency"] = dependency
        if step == "sweep":
            p["map_count"], p["array_parallelism"] = nodes, nodes
        # what submitit runs: the given command (a container), else this interpreter, as SlurmExecutor defaults to
        command = " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(folder)])
        print(f"# ---- {step} job of study {study} " + (f"({nodes} array task(s), shard i/{nodes})" if step == "sweep" else ""))
        print(_make_sbatch_string(command=command, folder=folder, **p))
    return {}


def local_executor(folder, minutes):
    """submitit's local executor with this process's GPUs. On its own it sets CUDA_VISIBLE_DEVICES to the GPUs
    asked of it (none here), which hid every GPU from the pipeline: a GPU workstation trained and swept on its
    CPU without a word. A setup line gives each step the caller's setting instead."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    setup = f"export CUDA_VISIBLE_DEVICES={shlex.quote(visible)}" if visible is not None else "unset CUDA_VISIBLE_DEVICES"
    ex = submitit.LocalExecutor(folder=folder)
    ex.update_parameters(timeout_min=minutes, setup=[setup])
    return ex


def run_local(folder, job, out, overrides, nodes, study_dir, minutes):
    """No Slurm: the same three steps through submitit's local executor, one after another, and the shards one
    after another too (each sweep uses every core and GPU of this machine)."""
    ex = local_executor(folder, minutes)

    def start(what, step):  # each step runs for minutes without a word here: say what and where its log is
        j = ex.submit(step)
        print(f"local: {what} (job {j.job_id}, log {j.paths.stdout})", flush=True)
        return j

    ids = {"train": start("dense training", TrainStep(job, out, overrides))}
    ids["train"].result()
    for i in range(nodes):
        s = start(f"sweep shard {i}/{nodes}", SweepShard(job, f"{i}/{nodes}", out, overrides))
        try:
            s.result()
        except Exception as e:  # the report still runs, as afterany does on Slurm
            print(f"shard job {s.job_id} failed: {str(e).strip().splitlines()[-1][:300]}")
    ids["report"] = start("report", ReportStep(study_dir))
    ids["report"].result()
    with contextlib.suppress(OSError):
        os.rmdir(folder)  # the executor makes its folder pattern ('.../%j') literally too; only if empty
    print(f"local pipeline finished; results in {study_dir}")
    return {k: v.job_id for k, v in ids.items()}


def cli(job, partition=None, nodes=1, gpus_per_node=0, cpus_per_task=None, mem=None, time="04:00:00",
        account=None, qos=None, container=None, cluster="slurm", out="results", signal_delay_s=90,
        dry_run=False, report_partition=None, **overrides):
    """Submit a whole study to Slurm: dense training -> NODES sweep shards (afterok) -> report (afterany).

    Args:
      job: the study's job file (jobs/*.yaml).
      partition: Slurm partition (checked against sinfo).
      nodes: number of sweep shards, one node (array task) each.
      gpus_per_node: GPUs per shard (trials are packed resources.trials_per_gpu per GPU); the dense training
        job takes one of them at most.
      cpus_per_task: CPUs per job.
      mem: memory per job, Slurm syntax (e.g. 64G).
      time: time limit per job, Slurm syntax (e.g. 04:00:00); on timeout jobs requeue and resume.
      account: Slurm account.
      qos: Slurm QOS.
      container: run every job inside this Apptainer image (apptainer exec --nv IMAGE python ...).
      cluster: slurm, or local to run the same pipeline on this machine without Slurm.
      out: results root; logs go to OUT/<study>/slurm/.
      signal_delay_s: seconds before the time limit at which Slurm signals the job to checkpoint.
      dry_run: print the sbatch scripts instead of submitting.
      report_partition: partition of the report job (default: --partition); it needs no GPU, at most 2 CPUs,
        8G and 30 minutes of the shards' request.
      overrides: any job-file setting as a dotted flag, as for pruneflow.sweep.
    """
    require("pruneflow.submit", "yaml", "submitit")  # the jobs' own packages are the compute nodes' (or the container's)
    submit(job, partition, nodes, gpus_per_node, cpus_per_task, mem, time, account, qos, container, cluster, out,
           signal_delay_s, dry_run, report_partition, **overrides)


def main():
    from .cli import run_cli

    run_cli(cli, name="pruneflow.submit")


if __name__ == "__main__":
    main()
