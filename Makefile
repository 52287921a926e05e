# The two commands a newcomer needs: `make demo` and `make test`. Each sets up .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup embedded bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk; a looser pin would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,gguf]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/posttrain demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

embedded: $(STAMP)
	$(BIN)/posttrain embedded build --force

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf runs .pytest_cache
