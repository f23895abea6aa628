# The commands a newcomer needs: `make run`, `make test` and `make check` (lint and types).
# Each creates ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: its CPU build lies on local disk; an open range would pull a CUDA build.
TORCH := torch==2.13.0

.PHONY: run test check bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(PY) -m pipeserve

test: $(VENV)/.installed
	$(PY) -m pytest

# The gates CI runs beside the tests: ruff over the code and its tests, mypy --strict over src/.
check: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy

# Not part of the tests: minutes of load on every core. Writes bench/RESULTS.md.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache
