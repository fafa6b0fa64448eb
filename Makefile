# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# A plain `torch` requirement pulls a multi-GB CUDA build; pin the CPU wheel by default (override freely).
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

.PHONY: demo test test-all lint bench clean browser

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_LOCAL) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q $(PIP_LOCAL) -e ".[dev,gpu]"  # gpu: triton, whose kernels tests run interpreted
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vidquant demo

test: $(STAMP) browser
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/formats.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache

# Headless Chromium renders report.html in tests/eval/test_report.py; without it that one test is skipped.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "browser test: using $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
			|| echo "could not install chromium: the browser test will be skipped"; \
	else echo "chromium not installed (needs apt-get and root): the browser test will be skipped"; fi
