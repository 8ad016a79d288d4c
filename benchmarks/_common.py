"""What every benchmark prints first: the command and the machine, so a quoted figure says where it came from."""

import platform
import sys

import torch

from pruneflow.infer.device import describe


def print_header(device, settings, columns):
    """Print the command, the machine and ``settings``, then the table head ``columns`` and a rule."""
    print(f"# {' '.join(sys.argv)}")
    print(f"# device {device} ({describe(device)}), torch {torch.__version__}, python {platform.python_version()}, "
          f"threads {torch.get_num_threads()}, {settings}")
    print(columns)
    print("-" * len(columns))
