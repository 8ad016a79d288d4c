"""Running a Fire command: one line and a non-zero exit for bad input, and ``--help`` anywhere on the line."""

import os
import sys

from .errors import EXTRAS, EXIT_USER_ERROR, exit_on_user_error, install_hint


def run_cli(component, name=None):
    """Run a Fire CLI; turn UserError (and Ctrl-C) into one line on stderr and a non-zero exit."""
    import fire

    try:
        return exit_on_user_error(fire.Fire, component, command=help_command(sys.argv[1:], component), name=name)
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
