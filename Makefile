# p2pdist developer targets. `make test` is what CI runs (.ci/run).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup lint typecheck test test-fast demo

setup:
	@scripts/setup.sh

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest -q

test-fast: lint typecheck
	$(VENV)/bin/pytest -q -m "not slow"

demo: setup
	$(PY) -m benchmarks.demo
