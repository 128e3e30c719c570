# Two commands for a newcomer: `make run` (the service, embedded defaults) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3
export RECEIVER_ADMIN_TOKEN ?= dev-admin-token

.PHONY: venv run test test-fast lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: venv
	$(BIN)/receiver migrate   # creates ./receiver.db the first time (serve never creates one)
	$(BIN)/receiver serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: venv lint
	$(BIN)/pytest -q -ra

# Unit and in-process tiers only (no subprocess, no service): seconds, for every change.
test-fast: venv
	$(BIN)/pytest -q tests/unit tests/inprocess

bench: venv
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/forward.py

clean:
	rm -rf $(VENV) receiver.db receiver.db-wal receiver.db-shm
