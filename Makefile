# The two commands a newcomer needs: `make run` and `make test`. Both create ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned: its CPU build lies on local disk; an open range would pull a CUDA build.
TORCH := torch==2.13.0

.PHONY: run test bench clean

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

# Not part of the tests: minutes of load on every core. Writes bench/RESULTS.md.
bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) src/*.egg-info .pytest_cache
