# p2pdist developer targets. `make test` is what CI runs (.ci/run).
# Tests are selected by directory: tests/unit starts no process and no registry (checked by
# tests/unit/conftest.py), tests/integration uses the real registry or a few processes,
# tests/e2e runs multi-process clusters and real runtimes.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup lint format-check typecheck test test-fast test-integration test-e2e demo

setup:
	@scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .

format-check: setup
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

# Everything: unit, integration and e2e (pyproject's testpaths, in that order).
test: lint format-check typecheck
	$(VENV)/bin/pytest -q

# The unit tests alone: no process, no registry, well under a minute.
test-fast: lint typecheck
	$(VENV)/bin/pytest -q tests/unit

test-integration: setup
	$(VENV)/bin/pytest -q tests/integration

test-e2e: setup
	$(VENV)/bin/pytest -q tests/e2e

demo: setup
	$(PY) -m benchmarks.demo
