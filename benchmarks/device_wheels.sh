#!/usr/bin/env bash
# Wheels for running gpu_suite.sh on a borrowed GPU machine whose image has torch but not Ray, Torch-Pruning or
# Fire (Python 3.12, no network): downloads them into .whl/ (git-ignored through .git/info/exclude) and drops
# Ray's Java jars, RLlib and Ray LLM from its wheel (79 -> 44 MB), so the tree that travels stays under 64 MiB.
#   bash benchmarks/device_wheels.sh
# then, on the GPU machine, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   PYTHON=python3 bash benchmarks/gpu_suite.sh OUT compile-bf16 packing-graph
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    ray==2.60.0 torch-pruning==1.6.1 fire==0.7.1 termcolor jsonschema referencing jsonschema-specifications rpds-py
python3 - <<'PY'
import glob, os, zipfile

drop = ("ray/jars/", "ray/rllib/", "ray/llm/")  # Java workers and libraries a sweep never imports
for src in glob.glob(".whl/ray-*.whl"):
    with zipfile.ZipFile(src) as zin:
        if not any(n.startswith(drop) for n in zin.namelist()):
            continue
        with zipfile.ZipFile(src + ".tmp", "w", zipfile.ZIP_DEFLATED) as zout:
            for item in zin.infolist():
                if item.filename.startswith(drop):
                    continue
                data = zin.read(item.filename)
                if item.filename.endswith(".dist-info/RECORD"):
                    data = b"\n".join(l for l in data.split(b"\n") if not l.decode().startswith(drop))
                zout.writestr(item, data)
    os.replace(src + ".tmp", src)
PY
du -sh .whl
