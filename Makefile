# pruneflow: the two commands in the README.
#   make demo   set up, then run the quickstart study (python -m pruneflow.sweep jobs/quickstart.yaml)
#   make test   set up, start what the tests need (Debian tools, a local Slurm), run the whole suite
#
# The virtualenv lives outside the checkout (torch's CUDA build is ~5 GB) so that clones share it; it is
# rebuilt whenever pyproject.toml changes. Override with `make VENV=.venv ...`.
VENV ?= $(HOME)/.cache/pruneflow/venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.pruneflow-$(shell cksum pyproject.toml | cut -d' ' -f1)
# torch pinned to the release this project is tested with; pip takes it from local wheels where present.
TORCH := torch==2.14.1 torchvision==0.29.1
# Two pytest workers: much of the suite waits (Ray and Slurm start-up, subprocesses), so two overlap well even
# on 2 cores. Tests marked xdist_group share one worker: the Slurm tests (the local Slurm has one node) and
# the modules that build one study for all their tests.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast system-deps slurm clean

# pip's chatter goes to a log; it is shown only when a step fails.
PIP = $(PY) -m pip install -q --log $(VENV)/pip.log
QUIET = > $(VENV)/pip-last.out 2>&1 || (cat $(VENV)/pip-last.out; exit 1)

setup: $(STAMP)
	@$(PIP) --no-deps --no-build-isolation -e . $(QUIET)

# The stamp is named after pyproject.toml's checksum, so no mtime prerequisite: a fresh clone (new mtimes)
# with the same pyproject reuses the environment.
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip $(QUIET)
	$(PIP) $(TORCH) $(QUIET)
	$(PIP) -e '.[hpc,test]' $(QUIET)
	$(PY) -c "import torch, nni, ray, h5py, submitit, onnxruntime, onnxscript, pytest, xdist, jsonschema"
	touch $@

demo: setup
	$(PY) -m pruneflow.sweep jobs/quickstart.yaml

system-deps:
	bash slurm/local/start.sh

test: setup system-deps
	PRUNEFLOW_REQUIRE_SLURM=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=30 tests

test-fast: setup
	$(PY) -m pytest -q -m "not slurm and not slow" tests

clean:
	rm -rf results/* build *.egg-info
