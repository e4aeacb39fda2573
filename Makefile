# Two entry points, both self-contained on a fresh machine: `make pipeline` and `make test`.
# Each creates .venv and installs the project into it when missing or when pyproject.toml changed.

PYTHON ?= python3
VENV := .venv
# dvc runs each stage's `python -m tasks.<stage>` through the shell: the venv must come first on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: pipeline test flow

$(VENV)/installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --editable '.[test]'
	touch $@

pipeline: $(VENV)/installed
	dvc repro
	dvc metrics show

flow: $(VENV)/installed
	python -m flows.pipeline

# Two workers, a test module each at a time (module fixtures such as a reference run stay in one
# worker): most tests wait on subprocesses and servers, so two cores run the suite in about half the time.
test: $(VENV)/installed
	ruff check .
	ruff format --check .
	python -m pytest --numprocesses 2 --dist loadfile

