# Two entry points on a fresh machine: `make bench` (the main job) and `make test`.
# Both create .venv (torch 2.13.0 CPU from the local disk, the package in editable mode with its
# C++ extension built against that torch) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BENCH_ARGS ?= --grid targets

.PHONY: install bench test demo lint format ext check-cuda clean

$(VENV)/.installed: setup.py pyproject.toml $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" setuptools wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev,train]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(VENV)/bin/aqcf-bench conv $(BENCH_ARGS)

# Two pytest workers (pytest-xdist), one per core of the project's CI machine: the suite is mostly
# single-threaded Python and small tensors. 1081 tests took 4 min 53 s so (2-core EPYC); the 809 of the
# day before took 7.5-8.5 min in one process.
TEST_WORKERS ?= 2
# Triton 3.6 (what the lent GPU machines run), beside the venv's own triton: the static tests
# (tests/triton_kernels/test_igemm_static.py) compile the kernels for sm_90 with it, no GPU needed.
TRITON36 ?= .venv-triton36
$(TRITON36)/.installed:
	$(PY) -m pip install --quiet --no-deps --target $(TRITON36) triton==3.6.0
	touch $@

# --durations: the slowest tests in every log, CI's included (the suite's time is budgeted, README "Tests").
test: install $(TRITON36)/.installed
	AQCF_TRITON36=$(TRITON36) $(PY) -m pytest -q -n $(TEST_WORKERS) --durations=15

# The synthetic demo: phantoms in LiTS (CT) and ATLAS (MRI) layouts, joint training (< 10 min on
# 2 CPU cores), evaluation next to the paper's table, Grad-CAM overlays. Everything under demo/.
DEMO_CASES ?= 24
demo: install
	$(PY) -m aqcf_kernels.data.synth demo/data/ct --layout lits --cases $(DEMO_CASES) --seed 0 --quiet
	$(PY) -m aqcf_kernels.data.synth demo/data/mri --layout atlas --cases $(DEMO_CASES) --seed 1 --quiet
	rm -rf demo/run
	$(VENV)/bin/aqcf-train --config configs/demo.yaml --out demo/run
	$(VENV)/bin/aqcf-evaluate demo/run --out demo/run/eval
	$(VENV)/bin/aqcf-explain demo/run --out demo/run/explain

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Rebuild the extension in place after editing csrc/ (incremental, seconds).
ext: install
	$(PY) setup.py build_ext --inplace

# Compile-and-link check of the extension against a CUDA build of torch (no GPU needed to build;
# nothing built here runs): a separate .venv-cuda with the lent GPU machines' torch, 2.11.0+cu130.
check-cuda:
	tools/check_cuda.sh

clean:
	rm -rf build *.egg-info aqcf_kernels/_C*.so demo
