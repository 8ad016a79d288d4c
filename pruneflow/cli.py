"""Running a Fire command: one line and a non-zero exit for bad input, and ``--help`` anywhere on the line."""

import os
import sys

from .errors import EXTRAS, EXIT_USER_ERROR, exit_on_user_error, install_hint


def run_cli(component, name=None):
    """Run a Fire CLI; turn UserError (and Ctrl-C) into one line on stderr and a non-zero exit."""
    import fire

    argv = help_command(sys.argv[1:], component)
    problem = None if argv[-1:] == ["--help"] else unknown_flag(argv, component)
    if problem:  # before any work: Fire itself complains only after the command has run
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    try:
        return exit_on_user_error(fire.Fire, component, command=argv, name=name)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ModuleNotFoundError as e:  # an optional package that no require() asked for up front
        # only the package itself missing: a missing submodule of an installed one (another NNI version) is a bug
        if e.name not in EXTRAS or os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        print(f"error: {install_hint(name or 'this command', [e.name])}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except BrokenPipeError:
        # the reader went away (``... | head``): stop quietly, as command-line tools do. Python would print
        # the error again when it flushes stdout at exit, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


def help_command(argv, component):
    """``argv``, or Fire's ``-- --help`` for ``component`` (after its subcommand, for a dict of commands) when
    ``argv`` asks for help anywhere. Fire itself shows help for ``--help`` only where nothing else is on the line
    and the command takes no **kwargs: ``sweep JOB --help`` ran into "unknown key 'help'" (sweep's dotted
    settings), ``sweep --help`` printed the help with exit code 2, and ``infer CKPT --help`` timed the checkpoint."""
    before = argv[:argv.index("--")] if "--" in argv else argv  # after Fire's separator, Fire's own business
    if not any(a in ("--help", "-h") for a in before):
        return argv
    sub = argv[:1] if isinstance(component, dict) and argv[:1] and argv[0] in component else []
    return sub + ["--", "--help"]


def unknown_flag(argv, component):
    """The problem with the first ``--flag`` in ``argv`` that the command does not take (Fire's --flag,
    --noflag, --flag=value, hyphens for underscores), or None. Commands that take **kwargs (the sweep's dotted
    settings) check their own."""
    import difflib
    import inspect

    args = argv[:argv.index("--")] if "--" in argv else argv
    fn = component
    if isinstance(component, dict):
        if not args or args[0] not in component:
            return None
        fn, args = component[args[0]], args[1:]
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for a in args:
        if not a.startswith("--") or len(a) == 2:
            continue
        key = a[2:].split("=", 1)[0].replace("-", "_")
        if key in names or (key.startswith("no") and key[2:] in names):
            continue
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        return f"unknown flag --{key}{hint}; --help lists them"
    return None
