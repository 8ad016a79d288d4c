"""Choosing a device by name, with one clear refusal when it is not there."""

import os
import sys

import torch

from .errors import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def available_devices():
    """Device types usable on this machine, best first."""
    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    # The documented API: torch.backends.mps.is_available() (is_built() alone says nothing of the hardware).
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    found.append("cpu")
    return found


def resolve_device(name="auto"):
    """'auto' picks cuda, then mps, then cpu; 'cuda:1' style indices are accepted."""
    name = str(name or "auto").lower()
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise UserError(f"unknown device {name!r}; valid devices: {', '.join(DEVICE_CHOICES)}")
    have = available_devices()
    if kind == "auto":
        return torch.device(have[0])
    if kind not in have:
        raise UserError(f"device {name!r} is not available on this machine; available: {', '.join(have)}")
    if ":" in name:
        index = name.split(":", 1)[1]
        if not index.isdigit():
            raise UserError(f"unknown device {name!r}; a device index is a whole number, e.g. cuda:1")
        if kind == "cuda" and int(index) >= torch.cuda.device_count():
            raise UserError(f"device {name!r} is not available; this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def keep_to_slurm_gpus(device, environ=os.environ, gpu_files="/dev/nvidia[0-9]*", override="write resources.device: cuda"):
    """Inside a Slurm job given no GPUs, device 'auto' means the CPU even where GPUs can be seen; returns True when
    it hid them (CUDA_VISIBLE_DEVICES="", inherited by the dense training's process and Ray's workers).

    Slurm names a job's GPUs (CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS) only when it gave it some. A cluster that does
    not fence devices (cgroup ConstrainDevices=no) lets every job see every GPU of the node, and a CPU job of
    ours would have run on GPUs Slurm gave to another job. Call before anything starts CUDA. An explicit
    ``cuda`` (``override`` says how to write it) is obeyed: clusters that hand out whole GPU nodes without GRES
    leave no trace in the job. The sweep, pruneflow.train and pruneflow.infer call it."""
    if "SLURM_JOB_ID" not in environ or str(device).lower() != "auto" or "CUDA_VISIBLE_DEVICES" in environ:
        return False  # not a Slurm job, the job file chose, or Slurm (or the user) already said which GPUs
    given = any(environ.get(v) for v in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS"))
    if given or environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0"):
        return False
    environ["CUDA_VISIBLE_DEVICES"] = ""
    import glob

    if glob.glob(gpu_files):
        print(f"note: Slurm gave job {environ['SLURM_JOB_ID']} no GPUs, so it runs on the CPU, leaving this node's "
              "GPUs to the jobs they were given to (ask Slurm for GPUs, e.g. --gpus-per-node 1; or "
              f"{override} to use the visible ones anyway)", file=sys.stderr, flush=True)
    return True


def job_cpus(environ=os.environ):
    """The CPUs this process should use: the cores it may run on, or fewer where Slurm gave the job fewer.

    Slurm's number is SLURM_CPUS_PER_TASK, or, for a job that did not ask --cpus-per-task, SLURM_CPUS_ON_NODE (its
    CPUs on this node: 1 for a bare sbatch). Where Slurm does not bind CPUs (TaskPlugin=task/none) the affinity is
    the whole node, so Slurm's number counts; a larger number inherited from a bigger allocation (salloc, then
    srun with fewer) must not oversubscribe this step's cores. macOS has no affinity: all its cores."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    on_node = environ.get("SLURM_CPUS_ON_NODE", "") if "SLURM_JOB_ID" in environ else ""
    slurm = environ.get("SLURM_CPUS_PER_TASK") or on_node
    return min(int(slurm), affinity) if slurm.isdigit() and int(slurm) > 0 else affinity


def synchronize(device):
    """Wait for queued kernels, so a timer measures work done rather than work launched."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe(device):
    """A one-line name of the hardware behind ``device`` (GPU name, or CPU model)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple " + (_cpu_name() or "silicon") + " (MPS)"
    return _cpu_name() or "CPU"


def _cpu_name():
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor()
