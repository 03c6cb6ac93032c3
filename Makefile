# Two commands on a fresh machine:
#   make demo   install, prepare the embedded models, run the system and stream a completion
#   make test   the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/configs/qwen-k3.toml
PROMPT ?= def quicksort(arr):

.PHONY: install models test-models demo serve test test-fast lint format clean llama-cpp

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/python -m common.kernels.native build

# the demo's models: Qwen2.5-Coder 0.5B and 1.5B GGUF files and their tokenizer (no conversion)
models: install
	$(BIN)/python -m common.model_store prepare qwen

# the tests' real model: SmolLM2's GGUF for the quantized runner, fp32 for the transformers one
test-models: install
	$(BIN)/python -m common.model_store prepare smollm2 --hf

demo: models
	$(BIN)/python -m deploy.launch $(CONFIG) --demo "$(PROMPT)"

serve: models
	$(BIN)/python -m deploy.launch $(CONFIG)

test: test-models
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not models and not slow"

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# llama.cpp from the pinned sdist, built once (~25 min on 2 cores): the benchmarks' optional baseline
llama-cpp: install
	$(BIN)/python -m benchmarks.llama_cpp build

clean:
	rm -rf $(VENV) .pytest_cache
