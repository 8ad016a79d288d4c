"""Utilisation sampling for a sweep: the 2022 report's ``nvidia-smi`` screenshot, as data.

A daemon thread in the sweep's driver samples, once per ``interval_s``, the machine's CPU load and memory
(psutil) and each visible GPU's utilisation and memory (NVML, from ``nvidia-ml-py``). The driver stores the
series in the shard's HDF5 file when its trials finish (``ResultStore.add_utilisation``); the report draws
them with each trial's start and end. Sampling is best effort: a missing library or a failing NVML call
drops that column, never the sweep.
"""

import os
import threading
import time


def visible_gpu_handles():
    """[(label, NVML handle)] for the GPUs this process may use (CUDA_VISIBLE_DEVICES, indices or UUIDs)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, no driver, no GPU
        return []
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is None:
            ids = [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            ids = [v.strip() for v in visible.split(",") if v.strip() and v.strip() != "-1"]
        handles = []
        for i, ident in enumerate(ids):
            if ident.isdigit():
                h = pynvml.nvmlDeviceGetHandleByIndex(int(ident))
            else:
                h = pynvml.nvmlDeviceGetHandleByUUID(ident)
            handles.append((f"gpu{i}", h))
        return handles
    except Exception:
        return []


class UtilisationSampler:
    """``with UtilisationSampler(1.0) as s: ...`` then ``s.series()`` -> {column: list}, ``s.attrs``."""

    def __init__(self, interval_s=1.0):
        self.interval_s = float(interval_s)
        self._columns = {}
        self._stop = threading.Event()
        self._thread = None
        self.attrs = dict(interval_s=self.interval_s, host=os.uname().nodename, started_at=time.time())

    def __enter__(self):
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="pruneflow-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """End sampling (idempotent); the samples stay readable through ``series()``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.interval_s + 1)
        self.attrs["ended_at"] = time.time()

    def _loop(self):
        try:
            import psutil
        except ImportError:
            psutil = None
        gpus = visible_gpu_handles()
        self.attrs["gpus"] = ",".join(self._gpu_name(h) for _, h in gpus)
        self.attrs["gpu_memory_total_bytes"] = ",".join(str(self._gpu_total(h)) for _, h in gpus)
        if psutil is not None:
            psutil.cpu_percent(None)  # the first call only starts the measurement interval
            self.attrs["cpu_count"] = psutil.cpu_count()
            self.attrs["memory_total_bytes"] = psutil.virtual_memory().total
        while True:
            row = {"time": time.time()}
            if psutil is not None:
                row["cpu_percent"] = psutil.cpu_percent(None)  # since the previous sample, all cores, 0-100
                row["memory_used_bytes"] = psutil.virtual_memory().used
            for label, h in gpus:
                row.update(self._gpu_row(label, h))
            for k, v in row.items():
                self._columns.setdefault(k, []).append(v)
            if self._stop.wait(self.interval_s):
                break

    @staticmethod
    def _gpu_name(h):
        try:
            import pynvml

            name = pynvml.nvmlDeviceGetName(h)
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            return "unknown"

    @staticmethod
    def _gpu_total(h):
        try:
            import pynvml

            return int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
        except Exception:
            return 0

    @staticmethod
    def _gpu_row(label, h):
        import pynvml

        # a failed reading is NaN, so every column keeps one value per sample
        row = {f"{label}_util_percent": float("nan"), f"{label}_memory_used_bytes": float("nan")}
        try:
            row[f"{label}_util_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
        except Exception:
            pass
        try:
            row[f"{label}_memory_used_bytes"] = float(pynvml.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            pass
        return row

    def series(self):
        """The samples so far: {column: list}, one value per sample in every column."""
        n = min((len(v) for v in self._columns.values()), default=0)  # the thread may be mid-row
        return {k: list(v[:n]) for k, v in self._columns.items()}
