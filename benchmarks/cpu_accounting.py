"""CPU seconds by process while a command runs: where a packed CPU sweep's cores go.

    python benchmarks/cpu_accounting.py -- python benchmarks/packing.py --ks 2
    python benchmarks/cpu_accounting.py --interval 0.5 -- python -m pruneflow.sweep jobs/quickstart.yaml --out /tmp/q

Runs the command, samples every process on the machine (psutil) every --interval seconds, and prints the CPU
seconds each one used while the command ran (a process is charged what its last sample saw, so one that exits
loses up to --interval of CPU; processes alive before the command are charged only their increase), grouped: the
command itself, Ray's trial workers (each worker's total listed too: a worker pays its imports once, then runs
trials), Ray's own services, and the rest.
"""

import argparse
import collections
import subprocess
import sys
import time

import psutil


def kind(name, cmdline):
    """Ray's trial workers title themselves ray::IDLE / ray::<task>; its agents ray::<Something>Agent."""
    title = cmdline or name
    if title.startswith("ray::") and "Agent" not in title:
        return "ray worker"
    if title.startswith("ray::") or name in ("raylet", "gcs_server") or "/ray/" in cmdline:
        scripts = [w.split("/")[-1] for w in title.split() if w.endswith(".py")]  # e.g. log_monitor.py
        short = name if name in ("raylet", "gcs_server") else (scripts[0] if scripts else title.split()[0])[:40]
        return f"ray service: {short}"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.interval <= 0:
        sys.exit("error: give --interval > 0 and a command after --")
    before = {p.pid: sum(p.cpu_times()[:2]) for p in psutil.process_iter()}
    t0 = time.perf_counter()
    child = subprocess.Popen(command)
    used = {}  # pid -> (label, CPU seconds while the command ran)
    me = psutil.Process().pid
    while True:
        done = child.poll() is not None
        for p in psutil.process_iter(["name", "cmdline"]):
            if p.pid == me:
                continue
            try:
                cpu = sum(p.cpu_times()[:2]) - before.get(p.pid, 0.0)
            except psutil.Error:
                continue
            cmdline = " ".join(p.info["cmdline"] or [])
            label = "the command" if p.pid == child.pid else kind(p.info["name"] or "", cmdline)
            used[p.pid] = (label or f"other: {(p.info['name'] or '?')[:30]}", cpu)
        if done:
            break
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    groups = collections.defaultdict(float)
    for pid, (label, cpu) in used.items():
        groups[label] += cpu
    print(f"\n# {' '.join(sys.argv)}\n# wall {wall:.1f} s, {psutil.cpu_count()} CPU(s): {wall * psutil.cpu_count():.1f} "
          f"CPU seconds available; exit {child.returncode}")
    for label, cpu in sorted(groups.items(), key=lambda kv: -kv[1]):
        if cpu >= 0.05:
            print(f"{cpu:8.1f} s  {label}")
    workers = sorted(cpu for label, cpu in used.values() if label == "ray worker" and cpu >= 0.05)
    print(f"ray workers: {len(workers)}, CPU seconds each: {', '.join(f'{c:.1f}' for c in workers)}")
    sys.exit(child.returncode)


if __name__ == "__main__":
    main()
