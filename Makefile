# Two commands on a fresh machine:
#   make demo   install, prepare the embedded models, run the system and stream a completion
#   make test   the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/configs/smollm2-k3.toml
PROMPT ?= def fibonacci(n):

.PHONY: install models demo serve test test-fast lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

models: install
	$(BIN)/python -m common.model_store prepare smollm2

demo: models
	$(BIN)/python -m deploy.launch $(CONFIG) --demo "$(PROMPT)"

serve: models
	$(BIN)/python -m deploy.launch $(CONFIG)

test: models
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not models and not slow"

lint: install
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
