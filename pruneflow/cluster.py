"""What the cluster gave this job, and how its processes stop: the one module that reads Slurm's variables,
cgroups and the scheduler's signals (``pruneflow.submit`` builds the jobs; this reads them from inside).

Standard library only (psutil inside ``job_memory``), so the portable ``pruneflow.infer`` may use it.
"""

import os
import signal
import sys
import threading


def slurm_job_id(environ=os.environ):
    """This process's Slurm job id, or '' outside Slurm."""
    return environ.get("SLURM_JOB_ID", "")


def job_tag(environ=os.environ):
    """A name unique to this process on its node: job, array task and pid inside Slurm, else the pid."""
    job = slurm_job_id(environ)
    return f"{job}_{environ.get('SLURM_ARRAY_TASK_ID', '')}_{os.getpid()}" if job else str(os.getpid())


def job_cpus(environ=os.environ):
    """The CPUs this process should use: the cores it may run on, or fewer where Slurm gave the job fewer.

    Slurm's number is SLURM_CPUS_PER_TASK or, for a job that did not ask --cpus-per-task, SLURM_CPUS_ON_NODE.
    Where Slurm does not bind CPUs (TaskPlugin=task/none) the affinity is the whole node, so Slurm's number
    counts. macOS has no affinity: all its cores."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    on_node = environ.get("SLURM_CPUS_ON_NODE", "") if slurm_job_id(environ) else ""
    slurm = environ.get("SLURM_CPUS_PER_TASK") or on_node
    return min(int(slurm), affinity) if slurm.isdigit() and int(slurm) > 0 else affinity


def slurm_gpus_unused_note(cuda_gpus, environ=os.environ):
    """A note when Slurm gave this job GPUs that CUDA cannot use (``cuda_gpus`` it sees: 0), else ''."""
    given = environ.get("CUDA_VISIBLE_DEVICES") if slurm_job_id(environ) else None
    if given and cuda_gpus == 0:
        return f"note: Slurm allocated GPU(s) {given} but CUDA cannot use them here; running on CPU"
    return ""


def keep_to_slurm_gpus(device, environ=os.environ, gpu_files="/dev/nvidia[0-9]*", override="write resources.device: cuda"):
    """Inside a Slurm job given no GPUs, device 'auto' means the CPU even where GPUs can be seen; returns True when
    it hid them (CUDA_VISIBLE_DEVICES="", inherited by every child process). Call before anything starts CUDA.

    A cluster that does not fence devices lets every job see every GPU of the node: a CPU job would run on GPUs
    Slurm gave to another job. An explicit ``cuda`` (``override`` says how to write it) is obeyed: clusters that
    hand out whole GPU nodes without GRES leave no trace in the job."""
    if not slurm_job_id(environ) or str(device).lower() != "auto" or "CUDA_VISIBLE_DEVICES" in environ:
        return False  # not a Slurm job, the job file chose, or Slurm (or the user) already said which GPUs
    given = any(environ.get(v) for v in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"))
    if given or environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0"):
        return False
    environ["CUDA_VISIBLE_DEVICES"] = ""
    import glob

    if glob.glob(gpu_files):
        print(f"note: Slurm gave job {slurm_job_id(environ)} no GPUs, so it runs on the CPU, leaving this node's "
              "GPUs to the jobs they were given to (ask Slurm for GPUs, e.g. --gpus-per-node 1; or "
              f"{override} to use the visible ones anyway)", file=sys.stderr, flush=True)
    return True


def job_memory(environ=os.environ, cgroup_root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """(bytes, where the limit comes from): the host memory this job may use, the least of the machine's RAM,
    Slurm's grant (--mem, or --mem-per-cpu x the job's CPUs on this node) and this process's cgroup limit."""
    import psutil

    limits = [(psutil.virtual_memory().total, "the machine's RAM")]
    per_node, per_cpu = environ.get("SLURM_MEM_PER_NODE", ""), environ.get("SLURM_MEM_PER_CPU", "")
    cpus = environ.get("SLURM_CPUS_ON_NODE") or environ.get("SLURM_CPUS_PER_TASK") or "1"
    if per_node.isdigit() and int(per_node) > 0:  # MB; --mem=0 means the whole node
        limits.append((int(per_node) * 2**20, "Slurm's --mem"))
    elif per_cpu.isdigit() and int(per_cpu) > 0 and cpus.isdigit():
        limits.append((int(per_cpu) * int(cpus) * 2**20, "Slurm's --mem-per-cpu x CPUs"))
    cgroup = cgroup_memory_limit(cgroup_root, proc_cgroup)
    if cgroup is not None:
        limits.append((cgroup, "the cgroup's memory limit"))
    return min(limits)


def cgroup_memory_limit(root="/sys/fs/cgroup", proc_cgroup="/proc/self/cgroup"):
    """The lowest memory limit on this process's cgroup and its parents (v2 memory.max, v1
    memory.limit_in_bytes); None where none is set (or cgroups cannot be read)."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for i in range(len(parts), -1, -1):  # a parent's limit binds its children too
            try:
                with open(os.path.join(base, *parts[:i], name)) as f:
                    value = f.read().strip()
            except OSError:
                continue
            if value.isdigit() and int(value) < 2**60:  # 'max' (v2) and v1's huge number: no limit
                found.append(int(value))
    return min(found) if found else None


# ---------------------------------------------------------------------------------------------- signals

_stopped_by = None  # the signal that stopped this driver (install_stop_handlers('driver'))

ROLES = ("driver", "worker", "child", "finished")


def install_stop_handlers(role):
    """How a process of ours reacts to the scheduler's signals (only from the main thread; else nothing).

    driver: SIGTERM (Slurm's timeout or preemption, scancel) leaves through the normal exits, so Ray is shut
      down, finished trials are recorded and locks are released; the same command resumes.
    worker (a trial) and child (the dense training's process): Slurm's warning before a time limit (USR1/USR2)
      may reach every process of the job and is the driver's to act on; a child also leaves Ctrl-C to its parent,
      which stops it.
    finished (a submitit job whose work is on disk): a late warning must neither fail nor requeue it."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    if threading.current_thread() is not threading.main_thread():
        return
    if role == "driver":
        signal.signal(signal.SIGTERM, _stop_driver)
        return
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if role == "child":
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _stop_driver(signum, frame):
    global _stopped_by
    _stopped_by = signum
    print(f"stopped by signal {signum} (SIGTERM): finished trials are in the results file; the same command "
          "resumes", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def stopped_by():
    """The signal number that stopped this driver, or None."""
    return _stopped_by
