# The two commands of the README: `make demo` and `make test`. Each prepares the
# machine first (scripts/setup.sh), so they work on a fresh checkout.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-quick lint bench clean

setup:
	@scripts/setup.sh

demo: setup
	$(VENV)/bin/walsaga demo $(DEMO_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Lint, types, then the whole suite (slow tests included), a test file per worker:
# most of the suite waits on Postgres, the broker and processes, so two workers
# (each with its own cluster and broker) halve the time on two cores.
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# The quick part only: unit tests and the fast integration tests.
test-quick: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/capture_bench.py
	$(PY) bench/relay_bench.py
	$(PY) bench/relay_floor.py
	$(PY) bench/publish_bench.py
	$(PY) bench/fetch_wait.py
	$(PY) bench/wake_floor.py
	$(PY) bench/batch_bench.py
	$(PY) bench/saga_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .import_linter_cache .walsaga
