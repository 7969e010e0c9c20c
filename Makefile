# shardwise — the two Quickstart commands are `make demo` and `make test`.
# Both create/refresh .venv at the repo root. On a machine without an NVIDIA GPU the CPU build of torch
# is pinned (torch==2.13.0 is on local disk here; any other spec downloads a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch>=2.5,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-all lint bench bench-generation assets clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e ".[dev]"
	touch $(STAMP)

assets: $(STAMP)
	$(PY) -m infra.assets fetch

demo: $(STAMP)
	$(PY) -m jobs.demo

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests

lint: $(STAMP)
	$(PY) -m ruff check pipeline models jobs infra tests bench
	$(PY) -m ruff format --check pipeline models jobs infra tests bench
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) -m bench.text_classification

bench-generation: $(STAMP)
	$(PY) -m bench.generation --task text-generation
	$(PY) -m bench.generation --task summarization

clean:
	rm -rf $(VENV) .pytest_cache
