"""What every benchmark prints first: the command and the machine, so a quoted figure says where it came from."""

import os
import platform
import sys

import torch

from pruneflow.infer.device import describe
from pruneflow.infer.errors import EXIT_USER_ERROR, UserError


def run(main):
    """``main()`` with pruneflow's rule for bad input (an unknown model, precision, device...): one line on
    stderr and exit 2, no traceback (PRUNEFLOW_DEBUG=1 re-raises)."""
    try:
        main()
    except UserError as e:
        if os.environ.get("PRUNEFLOW_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def print_header(device, settings, columns):
    """Print the command, the machine and ``settings``, then the table head ``columns`` and a rule."""
    print(f"# {' '.join(sys.argv)}")
    print(f"# device {device} ({describe(device)}), torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}, {settings}")
    print(columns)
    print("-" * len(columns))
