# One-word entry points. Every target builds .venv from nothing when it is missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup browser demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	$(BIN)/scope-ray demo

# The HTML report's test opens it in headless Chromium from Debian's packages. Installed when
# missing and we are root (CI); otherwise that one test is skipped with the reason (failed under CI=true).
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; }

test: setup browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/bench_extract.py
	$(BIN)/python bench/bench_train_sae.py
	$(BIN)/python bench/bench_probe.py

clean:
	rm -rf $(VENV) results scope-ray-demo .pytest_cache
