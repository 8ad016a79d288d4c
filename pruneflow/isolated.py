"""Run one function in a process of its own, as if it were called here.

Why: a sweep trains its dense model before it packs K trials onto the GPU. Trained in the sweep's own process,
the dense model's CUDA context, the caching allocator's pool (cached blocks are kept, not returned) and any
CUDA-graph pools stayed reserved on the GPU for the whole sweep: memory the packed trials could not use and
that ``trials_per_gpu: auto``'s probe (free memory before and after, trial.probe_memory) counted as a trial's.
A process that has ended holds nothing.

The function's output goes to the same terminal (progress bars as before), its return value or UserError comes
back, and it stops when this process stops (Ctrl-C, Slurm's SIGTERM), so no orphan keeps training.
"""

import signal
import sys

from .errors import UserError


def run_isolated(fn, what, **kwargs):
    """``fn(**kwargs)`` in a fresh (spawned) process; returns its result. ``what`` names the work in messages.

    A UserError in the child is raised again here (one line, exit 2); any other exception prints its traceback
    in the child and raises RuntimeError here; a child killed outright (the OOM killer) raises UserError."""
    import multiprocessing as mp

    # spawn, not fork: forking a process that has initialised CUDA (or holds Ray's threads) is unsafe
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, kwargs), name=f"pruneflow {what}")
    sys.stdout.flush()
    sys.stderr.flush()
    proc.start()
    send.close()  # the child holds the only write end: its exit ends the pipe
    try:
        # short waits: the driver's SIGTERM handler (cluster.install_stop_handlers) runs between them
        while not receive.poll(0.5):
            if not proc.is_alive() and not receive.poll(0):
                break
        try:
            outcome, value = receive.recv()
        except EOFError:  # it died without answering
            proc.join()
            if proc.exitcode == -signal.SIGTERM:  # the scheduler stopped the whole job; this process is next
                raise SystemExit(128 + signal.SIGTERM) from None
            how = (f"was killed by signal {-proc.exitcode} ({signal.Signals(-proc.exitcode).name}; SIGKILL is "
                   "often the out-of-memory killer)" if proc.exitcode < 0 else f"exited with status {proc.exitcode}")
            raise UserError(f"{what} stopped: its process {how}") from None
    finally:
        if proc.is_alive():
            proc.terminate()  # Ctrl-C or SIGTERM here: stop the work too (its last finished state is on disk)
        proc.join()
        receive.close()
    if outcome == "error":
        raise UserError(value)
    if outcome == "crash":
        raise RuntimeError(f"{what} failed: {value} (its traceback is printed above)")
    return value


def _child(send, fn, kwargs):
    from .cluster import install_stop_handlers

    install_stop_handlers("child")  # Ctrl-C and the scheduler's warnings are the parent's to act on
    try:
        result = ("ok", fn(**kwargs))
    except UserError as e:
        result = ("error", str(e))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        import traceback

        traceback.print_exc()
        result = ("crash", f"{type(e).__name__}: {str(e)[:500]}")
    sys.stdout.flush()
    sys.stderr.flush()
    send.send(result)
    send.close()
