# Two entry points, both self-contained on a fresh machine: `make pipeline` and `make test`.
# Each creates .venv and installs requirements.lock into it, exactly (what the lock lacks is removed), when
# .venv is missing or the lock changed; then checks that the lock was made from today's pyproject.toml.
# `GPU=1` installs requirements-gpu.lock instead (the gpu extra: TensorFlow's CUDA libraries, nvidia-ml-py).
# `make lock` remakes both lock files after pyproject.toml's dependencies change.

PYTHON ?= python3
VENV := .venv
GPU ?= 0
LOCK := $(if $(filter 1,$(GPU)),requirements-gpu.lock,requirements.lock)
# One stamp for each lock: switching between requirements.lock and requirements-gpu.lock syncs again.
INSTALLED := $(VENV)/$(LOCK).installed
# uv installs a lock several times faster than pip, and writes the lock files; this release wrote them.
UV_VERSION := 0.13.9
UV := $(VENV)/bin/uv --quiet
# Passed on to uv pip compile by `make lock`: --upgrade (every package) or --upgrade-package <name>.
LOCK_ARGS ?=
# dvc runs each stage's `python -m tasks.<stage>` through the shell: the venv must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# `make lock` resolves for Python 3.10 with the interpreter at hand: uv must not try to download another.
export UV_PYTHON_DOWNLOADS := never

.PHONY: pipeline test flow lock lock-check

# .venv with uv in it (pip comes with the venv; uv pip sync leaves pip and uv alone).
define bootstrap
test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
$(VENV)/bin/python -m pip install --quiet --quiet 'uv==$(UV_VERSION)'
endef

# The project itself is built with the lock's setuptools: nothing in .venv comes from outside the lock.
# Every module is compiled to bytecode here, once: where Python writes no bytecode (PYTHONDONTWRITEBYTECODE,
# as containers often set, or a read-only .venv) every process would otherwise compile the ~4,000 modules
# of TensorFlow, Keras and MLflow again, 7 s of each stage's and test's start on 2 cores.
# Rebuilt when the lock or this recipe changes.
$(INSTALLED): $(LOCK) Makefile
	$(bootstrap)
	rm -f $(VENV)/*.installed
	$(UV) pip sync --python $(VENV)/bin/python --require-hashes --compile-bytecode $(LOCK)
	$(UV) pip install --python $(VENV)/bin/python --no-deps --no-build-isolation --editable .
	touch $@

lock-check: $(INSTALLED)
	python tests/test_lock.py

# Universal: one lock for every OS and each Python release from the oldest requires-python allows (uv would
# start at the running interpreter's). Hashes for every file; no index URL (uv's own setting decides).
LOCK_FLAGS = --universal --python-version 3.10 --generate-hashes --custom-compile-command 'make lock' $(LOCK_ARGS)

# The GPU lock is constrained by the CPU lock: both pin the same versions, the GPU one adds CUDA's packages.
lock:
	$(bootstrap)
	$(UV) pip compile pyproject.toml --extra test --extra onnx $(LOCK_FLAGS) -o requirements.lock
	$(UV) pip compile pyproject.toml --extra test --extra onnx --extra gpu --constraints requirements.lock \
		$(LOCK_FLAGS) -o requirements-gpu.lock
	$(VENV)/bin/python tests/test_lock.py --stamp

pipeline: lock-check
	dvc repro
	dvc metrics show

flow: lock-check
	python -m flows.pipeline

# Two workers, a test module each at a time (module fixtures such as a reference run stay in one
# worker): most tests wait on subprocesses and servers, so two cores run the suite in about half the time.
test: lock-check
	ruff check .
	ruff format --check .
	python -m pytest --numprocesses 2 --dist loadfile --no-loadscope-reorder
