"""The node's trials as Ray tasks: a private Ray instance, the probes that packing asks for, and a pool that
submits, waits, retries and, when the job is stopped, keeps what finished meanwhile.

The driver is the only writer of the results file: each finished trial is stored the moment it comes back.
"""

import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading

from .. import cluster
from ..errors import UserError
from ..files import DiskFull


RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's single-node switch: node IP 127.0.0.1, servers bind there
    "RAY_AUTH_MODE": "token",  # explicit: Ray's default has changed across versions
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


@contextlib.contextmanager
def local_ray(cpus, gpus):
    """A Ray instance private to this process: reachable only on loopback and only with a fresh token, no
    dashboard, a small object store (trials exchange only small records). Its files live in a directory only
    this user can enter: the token (mode 0600, not the shared ``~/.ray``) and Ray's temp dir, which Ray
    itself makes world-writable."""
    # mkdtemp: mode 0700, a name no other user can have taken first; short: Ray's socket paths stay < 108 bytes
    private = tempfile.mkdtemp(prefix=f"pf-ray-{cluster.job_tag()}-", dir="/tmp")
    token_path = os.path.join(private, "auth_token")
    with os.fdopen(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in (*RAY_ENV, "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    on_term = signal.getsignal(signal.SIGTERM)  # Ray, then the driver, replace it: a caller gets it back
    os.environ.update(RAY_ENV, RAY_AUTH_TOKEN_PATH=token_path)  # Ray's processes inherit these
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    try:
        ray_started(cpus, gpus, os.path.join(private, "r"))
        cluster.install_stop_handlers("driver")  # again: Ray's core worker replaced it with a crash handler
        yield
    finally:
        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        shutil.rmtree(private, ignore_errors=True)
        if on_term is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_term)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ray_started(cpus, gpus, temp_dir):
    """``ray.init`` for :func:`local_ray`, checked to be on loopback; a SIGTERM during start-up becomes the
    usual exit 143."""
    import ray

    if tuple(int(x) for x in ray.__version__.split(".")[:2] if x.isdigit()) < (2, 60):
        raise UserError(f"Ray {ray.__version__} is too old: a sweep's Ray needs token auth and loopback binding "
                        "(pip install 'ray>=2.60,<3')")
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import: ray may have been imported before RAY_ENV was set
    Config.initialize("")  # likewise RAY_AUTH_MODE
    AuthenticationTokenLoader.instance().reset_cache()  # a second Ray in this process has a token of its own
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, _temp_dir=temp_dir,
                 object_store_memory=100 * 1024 * 1024, log_to_driver=False, logging_level="ERROR")
    except SystemExit as e:  # SIGTERM during start-up reaches Ray's own handler, sys.exit(15)
        if e.code == 15:
            print("stopped by signal 15 (SIGTERM) while Ray started; the same command resumes", file=sys.stderr)
            raise SystemExit(143) from None
        raise
    gcs = ray.get_runtime_context().gcs_address
    if not gcs.startswith(("127.", "[::1]", "localhost")):
        raise UserError(f"Ray {ray.__version__} started on {gcs}, not loopback; pruneflow needs ray>=2.60")


def remote_for(fn, plan):
    """``fn`` as a Ray remote function with a plan's resources and worker reuse (packing.plan_packing)."""
    import ray

    return ray.remote(max_retries=0, max_calls=plan.max_calls)(fn).options(**plan.options)


def run_alone(fn, *args, num_gpus=0, num_cpus=1, max_retries=0):
    """``fn(*args)`` in a single-use Ray worker, waited for in short steps (Slurm's signals are handled between
    them); the worker's process, CUDA context and memory are gone when it returns. ``max_retries``: new workers
    Ray may start when one dies."""
    import ray

    ref = (ray.remote(max_retries=max_retries, max_calls=1)(fn).options(num_gpus=num_gpus, num_cpus=num_cpus)
           .remote(*args))
    while not ray.wait([ref], timeout=1.0)[0]:
        pass
    return ray.get(ref)


def worker_died(t, e, memory_bounded):
    """The failure record of trial ``t`` whose worker process died (``e``: Ray's error), e.g. killed for memory."""
    from ..record import TrialRecord

    hint = "" if memory_bounded else (" (if the node ran out of memory: resources.memory_per_trial runs fewer "
                                      "trials at a time)")
    return TrialRecord.failure(t, f"worker died{hint}: {type(e).__name__}: {str(e)[:500]}")


class TrialPool:
    """Submits trials through ``remote`` (``remote.remote(trial, *args)`` returns a TrialRecord), retries a failed
    one up to ``retries`` times, and stores each kept record in ``store``."""

    def __init__(self, store, remote, args, retries, per_device, memory_bounded, total, progress):
        from tqdm import tqdm

        self.store, self.remote, self.args, self.retries = store, remote, args, retries
        self.per_device, self.memory_bounded = per_device, memory_bounded
        self.attempts, self.pending = {}, {}
        self.counts = {"done": 0, "failed": 0}
        self.bar = tqdm(total=total, unit="trial", disable=not progress, dynamic_ncols=True)

    def submit(self, t):
        self.attempts[t.id] = self.attempts.get(t.id, 0) + 1
        self.pending[self.remote.remote(t, *self.args)] = t

    def settle(self, t, record, per_device=None):
        """A trial came back: retry it if it failed and has attempts left, else keep its record."""
        attempts = self.attempts.setdefault(t.id, 1)
        if record.status == "disk_full":  # no retry and no record: the same command reruns it later
            raise DiskFull(record.error)
        if record.status != "done" and attempts <= self.retries:
            self.bar.write(f"trial {t.id} failed ({record.error[:200]}); retrying ({attempts}/{self.retries})")
            self.submit(t)
            return
        self._keep(record, attempts, per_device)
        if record.status != "done":
            self.bar.write(f"trial {t.id} failed: {record.error[:300]}")
        self.bar.update(1)

    def _keep(self, record, attempts, per_device=None):
        record.attempts = attempts
        record.trials_per_device = per_device or self.per_device
        self.store.add(record)
        self.counts["done" if record.status == "done" else "failed"] += 1

    def run(self, trials, slots):
        """Submit ``trials`` and wait until every one is kept; Ray runs ``slots`` of them at a time."""
        import ray

        for t in trials:
            self.submit(t)
        try:
            while self.pending:
                self.bar.set_postfix(done=self.counts["done"], failed=self.counts["failed"],
                                     running=min(len(self.pending), slots))
                # a short timeout keeps the driver responsive to Slurm's signals (handlers run between waits)
                ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
                if not ready:
                    continue
                t = self.pending.pop(ready[0])
                try:
                    record = ray.get(ready[0])
                except Exception as e:  # the worker died (OOM, segfault): same treatment as a raised error
                    record = worker_died(t, e, self.memory_bounded)
                self.settle(t, record)
        finally:
            self.drain()

    def drain(self):
        """Stopped early (SIGTERM, Ctrl-C) or done: keep the trials that finished in the meantime."""
        import ray

        if self.pending:
            ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
            for ref in ready:
                try:
                    record = ray.get(ref, timeout=0)
                except Exception:
                    continue
                if record.status == "done":
                    self._keep(record, self.attempts[self.pending[ref].id])
        self.bar.set_postfix(done=self.counts["done"], failed=self.counts["failed"], running=0)
        self.bar.close()
