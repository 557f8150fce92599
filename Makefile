# `make test` builds .venv from scratch on a fresh machine (PyPI only) and runs lint + the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that pip finds on these machines; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test lint clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

lint: install
	$(PY) -m ruff check src tests bench

test: install lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
