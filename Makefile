# `make demo` and `make test` set themselves up on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

# The baseline at full size (about a minute), then every method's experiment at its
# --quick size, each into runs/demo/<name>; the README lists the full-size commands.
METHODS := lottery late_phase likelihood_ratio straight_through invariant_path

demo: $(STAMP)
	$(PY) -m experiments.train --workdir=runs/demo/train --noprogress
	for m in $(METHODS); do $(PY) -m experiments.$$m --workdir=runs/demo/$$m --quick --noprogress || exit 1; done
	@echo "demo results: runs/demo/*/results.json"

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 tests

# Speed ratios against each benchmark's named baseline (PyTorch for train_step).
BENCHMARKS := train_step pruning late_phase likelihood_ratio straight_through invariant_path

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	for b in $(BENCHMARKS); do $(PY) -m benchmarks.$$b || exit 1; done

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
