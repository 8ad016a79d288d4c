"""``python -m pruneflow <command> ...`` (or the ``pruneflow`` console script): every CLI behind one entry point.

``python -m pruneflow sweep JOB ...`` is exactly ``python -m pruneflow.sweep JOB ...``: the command's own
``main()`` parses the rest of the line, so each command keeps its own ``--help`` and its one-line errors.
With no command (what ``apptainer run containers/prune.sif`` calls) it runs the quickstart study; leading
flags go to that sweep, e.g. ``python -m pruneflow --out /results --train.epochs 1``.

Nothing heavy is imported here: a command's module is imported only when that command runs, so
``python -m pruneflow --help`` answers without loading torch.
"""

import importlib
import os
import sys

# command -> (module whose main() runs it, one line for the command list)
COMMANDS = {
    "train": ("pruneflow.train", "train a dense model (--init CKPT fine-tunes a pruned one instead)"),
    "prune": ("pruneflow.prune", "prune one checkpoint; print params / MACs / layer widths before -> after"),
    "sweep": ("pruneflow.sweep.driver", "one node's share of a study: dense training, then the trials -> HDF5 + checkpoints"),
    "submit": ("pruneflow.submit", "the whole study as Slurm jobs (train -> shard array -> report), with submitit"),
    "report": ("pruneflow.report", "figures and summary.md from a study's HDF5 shards"),
    "infer": ("pruneflow.infer.__main__", "latency and accuracy of checkpoints on this machine (needs torch only)"),
    "export": ("pruneflow.export", "checkpoints -> ONNX files, checked against torch in ONNX Runtime"),
    "convert": ("pruneflow.convert", "a pickled torch.save model -> a portable .safetensors checkpoint"),
    "data": ("pruneflow.data", "stage a data set on a machine with internet (data fetch cifar10 --data-root DIR)"),
}
HELP_WORDS = ("-h", "--help", "help")
QUICKSTART = os.path.join("jobs", "quickstart.yaml")


def usage():
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m pruneflow <command> [args...]   (or: pruneflow <command> ...)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`python -m pruneflow <command> --help` documents a command's parameters.",
              "With no command: run the quickstart study (jobs/quickstart.yaml); flags given go to that sweep,",
              "e.g. `python -m pruneflow --out results --finetune.epochs 1`."]
    return "\n".join(lines)


def packaged_quickstart():
    """The quickstart job file shipped inside the package (jobs/quickstart.yaml in a checkout links to it)."""
    from importlib import resources

    path = resources.files("pruneflow").joinpath("quickstart.yaml")
    return str(path) if path.is_file() else None


def find_quickstart():
    """jobs/quickstart.yaml in the current directory (a checkout, maybe edited), else the packaged one."""
    return QUICKSTART if os.path.isfile(QUICKSTART) else packaged_quickstart()


def option_value(args, flag, default):
    """The value of `--flag X` / `--flag=X` in a Fire argument list (last one wins, as in Fire)."""
    value = default
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def run_quickstart(args):
    job = find_quickstart()
    if job is None:
        print(f"error: no command given and no {QUICKSTART} here nor in the pruneflow installation; "
              f"commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    out = option_value(args, "--out", "results")
    print(f"pruneflow: no command given: running the quickstart study {job} -> {os.path.join(out, 'quickstart')} "
          f"(`python -m pruneflow --help` lists the commands)", flush=True)
    from . import sweep

    sys.argv = ["pruneflow sweep", job, *args]
    sweep.main()  # exits non-zero itself when trials failed or the input was bad
    study = os.path.abspath(os.path.join(out, "quickstart"))
    print(f"results: {study} (shard-*.h5, checkpoints/); figures: python -m pruneflow report {study}", flush=True)


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0].startswith("--") and args[0] not in HELP_WORDS and args[0] != "--version"):
        return run_quickstart(args)
    command, rest = args[0], args[1:]
    if command in HELP_WORDS:
        print(usage())
        return None
    if command == "--version":
        from . import __version__

        print(f"pruneflow {__version__}")
        return None
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[command][0])
    sys.argv = [f"pruneflow {command}", *rest]  # each main() reads its arguments from sys.argv
    return module.main()


if __name__ == "__main__":
    main()
