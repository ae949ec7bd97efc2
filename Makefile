# adaptflow — `make run` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

# Telemetry that fails offline.
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test test-fast repro deploy worker bench-orchestration clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/.installed

## run the main job: the whole pipeline on the built-in data (MNIST → UCI digits)
run: install
	$(BIN)/adaptflow run

# Test files run side by side on up to 4 cores (a file's tests stay together, and in order, on one worker);
# TEST_WORKERS=0 runs them one after another in this process.
TEST_WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxprocesses=4 --dist loadfile

## run the test suite (unit + integration)
test: install
	$(PYTEST)

## unit tests only
test-fast: install
	$(PYTEST) -m "not integration"

## the same stages through DVC
repro: install
	$(BIN)/dvc repro

## register the nightly deployment with the Prefect server at PREFECT_API_URL (then: make worker)
deploy: install
	$(BIN)/adaptflow deploy

## a process worker for the adaptflow work pool (Ctrl-C stops it)
worker: install
	$(BIN)/prefect worker start --pool adaptflow

## cold run, warm re-run, finetune-only change → benchmarks/results/orchestration.{json,md}
bench-orchestration: install
	$(BIN)/python benchmarks/orchestration.py

clean:
	rm -rf data/ingested data/augmented data/features models reports mlflow.db mlartifacts .adaptflow
