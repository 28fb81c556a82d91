# Set-up entry points. `make run` installs and runs the daemon; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The daemon wants the CUDA build PyPI serves by default; tests want a small CPU build.
TORCH_SPEC ?= torch
TEST_TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-test run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	# CPU torch first, so the package's `torch` requirement is already met (no multi-GB CUDA download).
	$(BIN)/pip install -q "$(TEST_TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"

# Runs the daemon on its default data folder (~/.local/share/i2v-daemon, or $I2V_DATA_DIR).
run: install
	$(BIN)/i2v-daemon run

lint: install-test
	$(BIN)/ruff check i2v_daemon tests $(wildcard bench)

test: install-test lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
