# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llm-compressor (the `quant` extra) caps transformers at 5.17 while the core runs on newer releases, so its tests
# run in a venv of their own; only the tests marked `quant` run there (the main suite already ran everything else).
QVENV := .venv-quant
QBIN := $(QVENV)/bin
QSTAMP := $(QVENV)/.installed

.PHONY: demo test test-quant setup embedded bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch first, pinned: the CPU build on disk; a looser pin would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,gguf]'
	touch $(STAMP)

$(QSTAMP): pyproject.toml
	test -x $(QBIN)/python || $(PY) -m venv $(QVENV)
	$(QBIN)/python -m pip install -q --upgrade pip
	$(QBIN)/python -m pip install -q torch==2.13.0
	@# the main venv's extras too, so every test module that collects there also collects here
	$(QBIN)/python -m pip install -q -e '.[test,gguf,quant]'
	touch $(QSTAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

test: $(STAMP)
	@# The embedded model is built (once, then cached) before pytest, outside any test's timeout: on a busy machine
	@# the build alone can take minutes.
	$(BIN)/posttrain embedded build
	$(BIN)/python -m pytest -q tests
	$(MAKE) --no-print-directory test-quant

test-quant: $(QSTAMP)
	$(QBIN)/python -m pytest -q -m quant tests/compress

embedded: $(STAMP)
	$(BIN)/posttrain embedded build --force

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf runs .pytest_cache
