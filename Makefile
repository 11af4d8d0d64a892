# Shortcuts for contributors; CI runs `bash .ci/run` (the lint gates, then the README's test command).
PY := .venv/bin/python
BIN := .venv/bin

.PHONY: setup lint format test-fast test check

setup:  ## .venv with CPU torch, the package, its dev extras and the offline MiniLM-L6 teacher
	bash .ci/setup

lint:  ## the gates CI runs before the tests
	$(BIN)/ruff check kdexp tests
	$(BIN)/ruff format --check kdexp tests
	$(BIN)/mypy

format:  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix kdexp tests
	$(BIN)/ruff format kdexp tests

test-fast:  ## the unit tests on tiny models (no real data or model; a few minutes on 2 cores)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not integration and not slow"

test:  ## everything CI runs: unit, slow and real-data integration tests
	GLUE_DIR=$${GLUE_DIR:-$$(cd .. && pwd)/shared/glue_data} $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=30

check:  ## kdexp-check: the preflight on this machine's devices (tiny models, every method, a few steps)
	$(BIN)/kdexp-check
