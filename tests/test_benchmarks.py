"""The benchmarks run in CI-sized mode so they cannot rot (their full-size figures live in docs/)."""
import subprocess
import sys

from conftest import ROOT


def test_backends_benchmark_quick():
    p = subprocess.run([sys.executable, "benchmarks/backends.py", "--quick", "--trials", "2"], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.startswith("simple_cnn")]
    assert {r[1] for r in rows} == {"nni", "depgraph"} and len(rows) == 4
    for r in rows:
        nominal, achieved, mac_reduction = float(r[3]), float(r[4]), float(r[5])
        assert achieved == nominal == 0.5 and mac_reduction > 3  # SimpleCNN: no coupled channels
    assert "# device cpu" in p.stdout
