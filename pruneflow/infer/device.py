"""Choosing a device by name, with one clear refusal when it is not there."""

import torch

from ..errors import UserError

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
