# One-word entry points. Every target builds .venv from nothing when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/scope-ray demo

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_train_sae.py
	$(BIN)/python bench/bench_probe.py

clean:
	rm -rf $(VENV) results scope-ray-demo .pytest_cache
