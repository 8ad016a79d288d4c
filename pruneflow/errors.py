"""One way to fail on bad input: a single clear line on stderr and a non-zero exit, never a traceback.

Standard library only, so that the portable ``pruneflow.infer`` and the rest of pruneflow share it.
"""

import os
import sys


class UserError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2."""


EXIT_USER_ERROR = 2


def exit_on_user_error(fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, with a UserError turned into one line on stderr and exit code 2.

    ``PRUNEFLOW_DEBUG=1`` re-raises so developers still get the traceback.
    """
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        if os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as e:  # a full disk that no atomic writer saw (a log, a library's own file)
        from .files import NO_SPACE, disk_full

        if e.errno not in NO_SPACE or os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        print(f"error: {disk_full(e.filename or 'a file')}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# Optional packages (import name -> pip name, the pyproject extra that installs it): a command run without one
# says so in one line rather than in a traceback.
EXTRAS = {"yaml": ("pyyaml", "sweep"), "h5py": ("h5py", "sweep"), "ray": ("ray", "sweep"),
          "matplotlib": ("matplotlib", "sweep"), "tqdm": ("tqdm", "sweep"), "psutil": ("psutil", "sweep"),
          "sklearn": ("scikit-learn", "sweep"), "torch_pruning": ("torch-pruning", "sweep"),
          "pynvml": ("nvidia-ml-py", "sweep"), "nni": ("nni", "nni"), "tensorboard": ("tensorboard", "nni"),
          "submitit": ("submitit", "hpc"), "onnx": ("onnx", "onnx"), "onnxruntime": ("onnxruntime", "onnx"),
          "onnxscript": ("onnxscript", "onnx")}


def missing_packages(*modules):
    """The import names among ``modules`` that cannot be imported here (nothing is imported)."""
    import importlib.util

    def absent(m):
        if m in sys.modules:
            return sys.modules[m] is None
        return importlib.util.find_spec(m) is None

    return [m for m in modules if absent(m)]


def require(command, *modules):
    """Refuse to start ``command`` (before any work) when one of the optional ``modules`` is not installed."""
    missing = missing_packages(*modules)
    if missing:
        raise UserError(install_hint(command, missing))


def install_hint(command, modules):
    names = ", ".join(EXTRAS[m][0] for m in modules)
    extras = sorted({EXTRAS[m][1] for m in modules})
    return (f"{command} needs {names}, not installed here: pip install 'pruneflow[{','.join(extras)}]' "
            f"(or pip install {' '.join(EXTRAS[m][0] for m in modules)})")


def check_whole(v, what, minimum):
    """``v`` if it is a whole number >= ``minimum``. Fire passes flags as parsed ('abc' stays a string), and
    True is an int in Python: both are refused here rather than crashing deep inside torch."""
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise UserError(f"{what} must be a whole number >= {minimum}, got {v!r}")
    return v


def check_above(v, what, bound, hint=""):
    """``v`` as a float if it is a number > ``bound`` (Fire passes '2x' as a string); ``hint`` says what it means."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = None
    if isinstance(v, bool) or x is None or not x > bound:
        raise UserError(f"{what} must be a number > {bound:g}{hint}, got {v!r}")
    return x


def check_flag(v, what):
    """``v`` as a bool. Fire gives True/False for --flag/--noflag and --flag=True, but the string 'true' for
    --flag=true, and the int 1 for --flag=1: accept those, refuse anything else (a typo would otherwise count
    as true)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    raise UserError(f"{what} must be true or false (--{what} / --no{what}), got {v!r}")


def _path(path):
    """Fire parses a bare number (``train 5``) to an int: as a path it is that name."""
    return str(path) if isinstance(path, (int, float)) else os.fspath(path)


def check_writable_file(path):
    """Fail early (before hours of work) if ``path`` cannot be created."""
    path = os.path.abspath(_path(path))
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {parent}: {e.strerror}") from None
    if os.path.isdir(path):
        raise UserError(f"output path {path} is a directory, expected a file name")
    _probe_write(parent)
    return path


def check_not_input(src, out, what):
    """Refuse to write ``what`` over its own input checkpoint: the input (a dense model: hours of training) would
    be gone, replaced by what was made of it."""
    src, out = str(src), str(out)
    if os.path.exists(src) and os.path.exists(out) and os.path.samefile(src, out):
        raise UserError(f"--out {out} is the input checkpoint itself; write the {what} to another file")


def check_writable_dir(path):
    path = os.path.abspath(_path(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {path}: {e.strerror}") from None
    _probe_write(path)
    return path


def _probe_write(directory):
    # A real write, not os.access: root passes os.access everywhere, read-only mounts do not.
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".pruneflow-probe-"):
            pass
    except OSError as e:
        raise UserError(f"output directory {directory} is not writable ({e.strerror})") from None
