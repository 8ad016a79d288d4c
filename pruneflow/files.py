"""Writing a file so that a reader, or the rerun after a crash, sees the old file or the new one and never half of
one; and a full disk or quota (scratch quotas are the commonest failure on clusters) as one line that names the
path and the free space, with everything finished before it kept.

Standard library only: the portable ``pruneflow.infer`` writes through it too.
"""

import contextlib
import errno
import os
import shutil

from .errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Writers that hide the errno (HDF5; torch.save given a path) count as out of space below this much free
NEARLY_FULL = 1 << 20


class DiskFull(UserError):
    """The output file system is full or over quota."""


def free_bytes(path):
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent); None if unknown."""
    d = os.path.abspath(os.fspath(path))
    while not os.path.isdir(d) and os.path.dirname(d) != d:
        d = os.path.dirname(d)
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def no_space(e, path):
    """Whether ``e`` is running out of space writing ``path``: an ENOSPC/EDQUOT anywhere in its chain (torch's
    writer wraps it in a RuntimeError) or, for writers that lose the errno, a file system left nearly full."""
    seen, x = set(), e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in NO_SPACE:
            return True
        x = x.__cause__ or x.__context__
    if isinstance(e, UserError):
        return False
    free = free_bytes(path)
    return free is not None and free < NEARLY_FULL


def disk_full(path):
    """The one-line error for a full file system while writing ``path``."""
    free = free_bytes(path)
    shown = "unknown space" if free is None else f"{free / 2**20:.1f} MiB"
    return DiskFull(f"no space left writing {path} ({shown} free on its file system); free some or use another "
                    "--out, then run the same command again: finished work is kept")


@contextlib.contextmanager
def atomic(path, tmp=None):
    """A temporary name next to ``path`` to write to (``tmp``, or ``path``.tmp-<pid>); when the block succeeds
    it is fsynced and renamed over ``path``. On failure it is removed and ``path`` is as it was; running out of
    space raises DiskFull."""
    path = os.fspath(path)
    tmp = tmp or f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not reach the disk before the data does
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C and SystemExit too: no half file is left behind
        # measured before removing: the half-written file is what filled the disk
        full = isinstance(e, Exception) and no_space(e, tmp)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if full:
            raise disk_full(path) from None
        raise


def write_text(path, text):
    """``text`` into ``path`` atomically."""
    with atomic(path) as tmp, open(tmp, "w") as f:
        f.write(text)
