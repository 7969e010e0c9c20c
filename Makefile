# shardwise — the two Quickstart commands are `make demo` and `make test`.
# Both create/refresh .venv at the repo root. On a machine without an NVIDIA GPU the CPU build of torch
# is pinned (torch==2.13.0 is on local disk here; any other spec downloads a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch>=2.5,torch==2.13.0)
STAMP := $(VENV)/.installed

.PHONY: venv chromium demo test test-all lint bench bench-generation bench-gpu assets clean

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

# The report/preview tests render pages in headless Chromium: Debian's package, installed when missing.
chromium:
	@test -x /usr/bin/chromium || { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

test: $(STAMP) chromium
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

# The four benchmarks at base size on CUDA against ../shared/GPU.md's anchors. Packs what the GPU machine
# lacks into .device/ (Ray and audio wheels, reviews, photos, speech), then runs where a GPU is visible;
# elsewhere prints the device command (bash bench/gpu.sh with .device carried).
bench-gpu: $(STAMP)
	test -f .device/site.tgz -a -f .device/bench-assets/texts.parquet || $(PY) -m bench.gpu pack
ifeq ($(HAS_GPU),1)
	$(PY) -m bench.gpu run
else
	@echo "no GPU here: run 'bash bench/gpu.sh' on the GPU machine with .device carried (device tool: carry [\".device\"])"
endif

clean:
	rm -rf $(VENV) .pytest_cache
