# Set-up entry points. `make run` installs and runs the daemon; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The daemon wants the CUDA build PyPI serves (about 6 GB) where an NVIDIA GPU is visible, and the CPU
# build (about 200 MB, from TORCH_CPU_INDEX) where none is; tests want a small CPU build.
TORCH_SPEC ?= torch
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TEST_TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# `make install` is done once: again only when pyproject.toml changes (the package is installed editable).
STAMP := $(VENV)/.i2v-daemon-installed

.PHONY: install install-test run serve test test-fast lint layers typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(STAMP)

# On a machine with an NVIDIA GPU, a CPU-only PyTorch (left by `make test`) is replaced by the CUDA build;
# on one without, the CPU build is installed (said first), never the CUDA build nothing here could use.
$(STAMP): pyproject.toml | $(BIN)/python
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	    if $(BIN)/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)" 2>/dev/null; then \
	        echo "make: a GPU is here but the installed PyTorch is a CPU build; installing the CUDA build ($(TORCH_SPEC))"; \
	        $(BIN)/pip install -q --force-reinstall "$(TORCH_SPEC)"; \
	    else \
	        $(BIN)/pip install -q "$(TORCH_SPEC)"; \
	    fi; \
	elif $(BIN)/python -c "import torch" 2>/dev/null; then \
	    echo "make: no NVIDIA GPU visible (nvidia-smi); keeping the PyTorch already installed"; \
	else \
	    echo "make: no NVIDIA GPU visible (nvidia-smi): installing the CPU build of PyTorch ($(TORCH_SPEC) from $(TORCH_CPU_INDEX), about 200 MB) instead of the 6 GB CUDA build; on a GPU machine, run make there"; \
	    $(BIN)/pip install -q --index-url "$(TORCH_CPU_INDEX)" "$(TORCH_SPEC)"; \
	fi
	$(BIN)/pip install -q -e .
	@touch $@

install-test: $(BIN)/python
	# CPU torch first, so the package's `torch` requirement is already met (no multi-GB CUDA download).
	@rm -f $(STAMP)  # the next `make install` checks the PyTorch build again (a GPU wants the CUDA one)
	$(BIN)/pip install -q "$(TEST_TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[test]"

# Runs the daemon on its default data folder (~/.local/share/i2v-daemon, or $I2V_DATA_DIR).
run: install
	$(BIN)/i2v-daemon run

# The HTTP API and page on 127.0.0.1:8765, beside `make run` (same data folder).
serve: install
	$(BIN)/i2v-daemon serve

lint: install-test
	$(BIN)/ruff check i2v_daemon tests $(wildcard bench)

# The layers contract (pyproject.toml [tool.importlinter], docs/development.md): imports point down only,
# and torch/diffusers stay in models/.
layers: install-test
	$(BIN)/lint-imports

typecheck: install-test
	$(BIN)/mypy

# The whole suite, two workers (the tests mostly wait on daemon subprocesses, ffmpeg, a browser).
test: install-test lint layers typecheck
	$(BIN)/python -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

# Day-to-day: the quick unit tests only (no daemon subprocesses), a few minutes on two cores.
test-fast: install-test
	$(BIN)/ruff check i2v_daemon tests $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .mypy_cache
