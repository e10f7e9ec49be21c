# make demo: set up .venv, install kvlink, run the main job.  make test: same set-up, then all tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this workplace's disk; set TORCH=torch (or another spec) to override.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test bench clean

setup: $(VENV)/.kvlink-installed

$(VENV)/.kvlink-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,fast,hf,sim]"
	touch $@

demo: setup
	$(VENV)/bin/kvlink demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(VENV)/bin/kvlink bench serde

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
