# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# A plain `torch` requirement pulls a multi-GB CUDA build; pin the CPU wheel by default (override freely).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_LOCAL) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PIP_LOCAL) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vidquant formats

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/formats.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
