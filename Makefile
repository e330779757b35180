# Everything a new machine needs: Python >= 3.10, make, and the package registry.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP_DEV := $(VENV)/.stamp-dev
STAMP_BENCH := $(VENV)/.stamp-bench
STAMP_BASE := $(VENV)/.stamp-base
LINT_DIRS := $(wildcard src tests benchmarks examples docs/_ext)

.PHONY: demo test lint typecheck docs pytest test-versions bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The demo needs the integrations it shows, not the test tools.
$(STAMP_BASE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[all]'
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_BASE)

$(STAMP_BENCH): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@ $(STAMP_DEV) $(STAMP_BASE)

demo: $(STAMP_BASE)
	$(BIN)/python -m offloop demo

lint: $(STAMP_DEV)
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/lint-imports

typecheck: $(STAMP_DEV)
	$(BIN)/mypy

# The documentation site, into site/: the guides of docs/ and the API reference
# from the docstrings. --strict turns every warning (a broken link, a docstring
# griffe cannot parse) into a failure.
docs: $(STAMP_DEV)
	$(BIN)/mkdocs build --strict

# The suite under coverage, with the floor of pyproject's [tool.coverage.report].
# `coverage run`, not pytest-cov: the `offloop.pytest_plugin` entry point imports
# offloop while pytest loads its plugins, before pytest-cov would start, so every
# module's top level would count as never run.
#
# Two workers (pytest-xdist): most tests wait on servers, child processes and
# events rather than compute, so two halve the suite's time even on two cores.
# A file run by hand (pytest tests/x.py) runs in one process as usual.
PYTEST_WORKERS ?= 2

pytest: $(STAMP_DEV)
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -n $(PYTEST_WORKERS)
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report

test: lint typecheck docs pytest

# The suite on Pythons other than CI's 3.11, each in its own .venv-X.Y (not part of `test`):
#   make test-versions TEST_PYTHONS="$HOME/.pyenv/versions/3.10.13/bin/python python3.13"
TEST_PYTHONS ?= python3.10 python3.12 python3.13
PYTEST_ARGS ?=

test-versions:
	@set -e; for py in $(TEST_PYTHONS); do \
		v=$$($$py -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
		[ -x .venv-$$v/bin/python ] || $$py -m venv .venv-$$v; \
		.venv-$$v/bin/python -m pip install --quiet -e '.[dev]'; \
		echo "== Python $$v"; \
		.venv-$$v/bin/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS); \
	done

bench: $(STAMP_BENCH)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .venv-*/ build site *.egg-info src/*.egg-info .mypy_cache .ruff_cache .pytest_cache .coverage .coverage.* htmlcov
