# `make demo` and `make test` set themselves up on a fresh machine (Python 3.11 + pip).
# Two installs share one .venv: the package alone (what the demo and the library need,
# about 1.0 GiB) and the package with the `dev` extra (tests, lint, docs; it adds TensorFlow
# and 1.4 GiB more). Each is redone when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint docs bench clean notebooks accel-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $(BASE_STAMP)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The development environment: the package and the `dev` extra.
setup: $(STAMP)

# The reproduction report: each method's headline comparison at the small size, 10 seeds,
# with 95% intervals and verdicts (resumable); ends with the verdict table.
demo: $(BASE_STAMP)
	$(PY) -m experiments.report --workdir=runs/report --config=experiments/configs/report.py:small
	@echo "open runs/report/report.html (or report.md) for the figures"

# Re-executes every notebook and stores its outputs in place.
notebooks: $(STAMP)
	$(PY) -c "from tests.helpers import notebook_names, run_notebook; [run_notebook(n, save=True) for n in notebook_names()]"

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal --durations=15 tests

# Speed ratios against each benchmark's named baseline (PyTorch for train_step).
BENCHMARKS := train_step seeds pruning late_phase likelihood_ratio straight_through invariant_path

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	for b in $(BENCHMARKS); do $(PY) -m benchmarks.$$b || exit 1; done

# On a machine with an accelerator: the test suite on JAX's default backend (not forced to
# CPU), the train-step benchmark against PyTorch on the same device, and one full-size run.
accel-check: $(STAMP)
	$(PY) -c "import jax; print('backend:', jax.default_backend(), jax.devices())"
	JAX_PLATFORMS= $(PY) -m pytest -q -n 0 tests
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.train_step
	$(PY) -m experiments.train --workdir=runs/accel/train --config=experiments/configs/train.py:paper

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy  # configured in pyproject.toml [tool.mypy]
	$(PY) -m pytest -q -n 0 tests/test_typing.py -k annotated  # every public def typed

# The API reference, generated from the docstrings into docs/api (offline, a few seconds).
docs: $(STAMP)
	$(PY) -m pdoc -o docs/api wspace
	@echo "open docs/api/index.html"

clean:
	rm -rf $(VENV) runs docs/api .pytest_cache
